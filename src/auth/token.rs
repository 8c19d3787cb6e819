//! Where a request's token comes from: `Authorization: Bearer` > the cookie named
//! `auth.cookie_name` > the `access_token` query parameter. Browsers' `EventSource` cannot set
//! headers, so they use the cookie or the query.
//!
//! The Mercure hub reads them in the order its protocol sets: `Authorization: Bearer` > the
//! `authorization` query parameter > the cookie named `mercure.cookie_name`.

use axum::http::{header, HeaderMap};

use super::AuthError;

/// Query parameter carrying a token.
pub const QUERY_PARAM: &str = "access_token";
/// Query parameter carrying a token at the Mercure hub.
pub const MERCURE_QUERY_PARAM: &str = "authorization";

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Cookie,
    Query,
}

/// A token found, and where.
type Found = Result<Option<(String, Source)>, AuthError>;

/// The request's token, if it carries one. A token found is returned whatever its content; an
/// `Authorization` header that is not a bearer token is an error (it was meant as credentials).
pub fn extract(headers: &HeaderMap, raw_query: Option<&str>, cookie_name: &str) -> Found {
    if let Some(found) = bearer(headers)? {
        return Ok(Some(found));
    }
    if let Some(found) = cookie(headers, cookie_name) {
        return Ok(Some(found));
    }
    Ok(query(raw_query, QUERY_PARAM))
}

/// The same in the Mercure hub's order: header, `?authorization=`, cookie.
pub fn extract_mercure(headers: &HeaderMap, raw_query: Option<&str>, cookie_name: &str) -> Found {
    if let Some(found) = bearer(headers)? {
        return Ok(Some(found));
    }
    if let Some(found) = query(raw_query, MERCURE_QUERY_PARAM) {
        return Ok(Some(found));
    }
    Ok(cookie(headers, cookie_name))
}

fn bearer(headers: &HeaderMap) -> Found {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Malformed("the Authorization header is not ASCII"))?;
        let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed(
                "the Authorization header must be `Bearer <token>`",
            ));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Malformed("the bearer token is empty"));
        }
        return Ok(Some((token.to_owned(), Source::Header)));
    }
    Ok(None)
}

fn cookie(headers: &HeaderMap, cookie_name: &str) -> Option<(String, Source)> {
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        let found = cookie::Cookie::split_parse(value)
            .filter_map(Result::ok)
            .find(|c| c.name() == cookie_name && !c.value().is_empty());
        if let Some(c) = found {
            return Some((c.value().to_owned(), Source::Cookie));
        }
    }
    None
}

fn query(raw_query: Option<&str>, param: &str) -> Option<(String, Source)> {
    form_urlencoded::parse(raw_query?.as_bytes())
        .find(|(name, value)| name == param && !value.is_empty())
        .map(|(_, value)| (value.into_owned(), Source::Query))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn bearer_wins_then_cookie_then_query() {
        let all = headers(&[
            ("authorization", "Bearer from-header"),
            ("cookie", "a=1; ssegate_token=from-cookie"),
        ]);
        let query = Some("topic=x&access_token=from-query");
        let got = |h: &HeaderMap, q| extract(h, q, "ssegate_token").unwrap().map(|(t, _)| t);
        assert_eq!(got(&all, query).as_deref(), Some("from-header"));
        let cookie = headers(&[("cookie", "a=1; ssegate_token=from-cookie")]);
        assert_eq!(got(&cookie, query).as_deref(), Some("from-cookie"));
        assert_eq!(got(&HeaderMap::new(), query).as_deref(), Some("from-query"));
        assert_eq!(got(&HeaderMap::new(), Some("topic=x")), None);
        let other_cookie = headers(&[("cookie", "other=1")]);
        assert_eq!(got(&other_cookie, None), None);
    }

    #[test]
    fn a_non_bearer_authorization_is_an_error() {
        for value in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "token"] {
            let h = headers(&[("authorization", value)]);
            assert!(extract(&h, None, "t").is_err(), "{value:?}");
        }
        let h = headers(&[("authorization", "bearer  abc ")]);
        assert_eq!(
            extract(&h, None, "t").unwrap(),
            Some(("abc".to_owned(), Source::Header))
        );
    }

    #[test]
    fn mercure_reads_bearer_then_query_then_cookie() {
        let cookie = "a=1; mercureAuthorization=from-cookie";
        let all = headers(&[("authorization", "Bearer from-header"), ("cookie", cookie)]);
        let query = Some("topic=x&authorization=from-query&access_token=native");
        let got = |h: &HeaderMap, q| extract_mercure(h, q, "mercureAuthorization").unwrap();
        assert_eq!(
            got(&all, query),
            Some(("from-header".to_owned(), Source::Header))
        );
        let only_cookie = headers(&[("cookie", cookie)]);
        assert_eq!(
            got(&only_cookie, query),
            Some(("from-query".to_owned(), Source::Query))
        );
        assert_eq!(
            got(&only_cookie, Some("topic=x&access_token=native")),
            Some(("from-cookie".to_owned(), Source::Cookie))
        );
        assert_eq!(got(&HeaderMap::new(), Some("access_token=native")), None);
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_credentials_never_panic"))]
        #[test]
        fn hostile_credentials_never_panic(
            authorization in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..80)),
            cookie in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..80)),
            query in proptest::option::of("[\\x00-\\x7f%=&]{0,120}"),
        ) {
            let mut h = HeaderMap::new();
            for (name, value) in [("authorization", authorization), ("cookie", cookie)] {
                if let Some(Ok(v)) = value.map(|v| HeaderValue::from_bytes(&v)) {
                    h.insert(name, v);
                }
            }
            let _ = extract(&h, query.as_deref(), "ssegate_token");
            let _ = extract_mercure(&h, query.as_deref(), "mercureAuthorization");
        }
    }
}
