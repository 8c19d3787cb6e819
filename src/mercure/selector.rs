//! Topic selectors: `*`, an exact topic, or an RFC 6570 URI template.
//!
//! A topic matches a selector as the reference hub (dunglas/mercure v0.24.2) decides it: the
//! selector is `*`, or equal to the topic, or a URI template whose regular expression (built as
//! its template library, yosida95/uritemplate, builds it) matches the whole topic.
//!
//! The template is parsed and turned into a regular expression here: the Rust crates for URI
//! templates expand them, none matches a string against one the way that library does, and the
//! match must be the same as Mercure's for applications to move without surprises. The `regex`
//! crate runs in time linear in the topic, so a hostile selector cannot stall a node.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use regex::Regex;

/// The reserved selector matching every topic.
pub const ANY: &str = "*";
/// Longest compiled template, so a selector cannot make a large automaton.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Compiled templates kept for reuse, at most.
const COMPILED_KEPT: usize = 10_000;

/// Compiled templates by their text, shared by the node's subscriptions: a compiled template
/// and its match caches cost kilobytes, and thousands of subscriptions name the same ones (every
/// user's token holds the same `https://example.com/users/{id}`). Past [`COMPILED_KEPT`]
/// templates, new ones are compiled for their subscription alone.
static COMPILED: LazyLock<Mutex<HashMap<String, Arc<Regex>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A parsed topic selector.
#[derive(Debug, Clone)]
pub enum Selector {
    /// `*`.
    Any,
    /// A string compared as it is (a URL, or anything without a template expression).
    Exact(String),
    /// A URI template; a topic equal to the template's text matches too. The compiled form is
    /// shared (one per node and template, while [`COMPILED`] has room): a `Regex` clone would
    /// bring a pool of match caches of its own.
    Template { text: String, regex: Arc<Regex> },
}

/// Why a selector cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("`{selector}` is not a valid URI template ({why}): a selector with `{{` must be one (`*` receives every topic)")]
pub struct BadSelector {
    pub selector: String,
    pub why: &'static str,
}

impl Selector {
    /// A selector from a subscriber's `topic` parameter: a string with `{` must be a valid
    /// template.
    pub fn parse(text: &str) -> Result<Selector, BadSelector> {
        if text == ANY {
            return Ok(Selector::Any);
        }
        if !text.contains('{') {
            return Ok(Selector::Exact(text.to_owned()));
        }
        let regex = template_regex(text).map_err(|why| BadSelector {
            selector: text.chars().take(100).collect(),
            why,
        })?;
        Ok(Selector::Template {
            text: text.to_owned(),
            regex,
        })
    }

    /// A selector from a token's claim: as the reference hub does, a string that is not a valid
    /// template is compared as it is (a token cannot be answered with a `400`).
    pub fn lenient(text: &str) -> Selector {
        Selector::parse(text).unwrap_or_else(|_| Selector::Exact(text.to_owned()))
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Selector::Any => true,
            Selector::Exact(exact) => exact == topic,
            Selector::Template { text, regex } => text == topic || regex.is_match(topic),
        }
    }

    /// The selector as given.
    pub fn as_str(&self) -> &str {
        match self {
            Selector::Any => ANY,
            Selector::Exact(text) | Selector::Template { text, .. } => text,
        }
    }
}

/// Whether any of `selectors` matches any of `topics`.
pub fn any_match<'t>(selectors: &[Selector], topics: impl IntoIterator<Item = &'t str>) -> bool {
    topics
        .into_iter()
        .any(|t| selectors.iter().any(|s| s.matches(t)))
}

/// RFC 6570 `unreserved` and `reserved` characters, as classes of a regular expression.
const UNRESERVED: &str = r"\x2d\x2e\x30-\x39\x41-\x5a\x5f\x61-\x7a\x7e";
const RESERVED: &str = r"\x21\x23\x24\x26-\x2c\x2f\x3a\x3b\x3d\x3f\x40\x5b\x5d";

/// What an expression's operator makes of its variables.
struct Operator {
    /// Written before the first variable.
    first: &'static str,
    /// Written between variables.
    separator: &'static str,
    /// `name=value` pairs rather than values.
    named: bool,
    /// Reserved characters pass unencoded (`+` and `#`).
    reserved: bool,
}

fn operator(op: char) -> Option<Operator> {
    let (first, separator, named, reserved) = match op {
        '+' => ("", ",", false, true),
        '#' => ("#", ",", false, true),
        '.' => (".", ".", false, false),
        '/' => ("/", "/", false, false),
        ';' => (";", ";", true, false),
        '?' => ("?", "&", true, false),
        '&' => ("&", "&", true, false),
        _ => return None,
    };
    Some(Operator {
        first,
        separator,
        named,
        reserved,
    })
}

/// A variable of an expression: only whether it is exploded matters to the match.
struct Varspec {
    explode: bool,
}

/// The regular expression matching every expansion of `template`, compiled once per node
/// while [`COMPILED`] has room.
fn template_regex(template: &str) -> Result<Arc<Regex>, &'static str> {
    let mut compiled = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(regex) = compiled.get(template) {
        return Ok(regex.clone());
    }
    let regex = Arc::new(compile_template(template)?);
    if compiled.len() < COMPILED_KEPT {
        compiled.insert(template.to_owned(), regex.clone());
    }
    Ok(regex)
}

/// Turns `template` into the regular expression matching every expansion, anchored at both ends.
fn compile_template(template: &str) -> Result<Regex, &'static str> {
    let mut out = String::from("^");
    let mut rest = template;
    while !rest.is_empty() {
        if let Some(expression) = rest.strip_prefix('{') {
            let end = expression
                .find('}')
                .ok_or("an expression has no closing `}`")?;
            write_expression(&mut out, &expression[..end])?;
            rest = &expression[end + 1..];
        } else {
            let end = rest.find('{').unwrap_or(rest.len());
            check_literals(&rest[..end])?;
            out.push('(');
            out.push_str(&regex::escape(&rest[..end]));
            out.push(')');
            rest = &rest[end..];
        }
    }
    out.push('$');
    regex::RegexBuilder::new(&out)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|_| "the template is too large")
}

/// RFC 6570 `literals`: any character but controls, space, `"'<>\^`|{}`, with `%` only as a
/// percent-encoded triplet.
fn check_literals(text: &str) -> Result<(), &'static str> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or("a `%` is not followed by two hex digits")?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err("a `%` is not followed by two hex digits");
            }
            i += 3;
            continue;
        }
        if b.is_ascii() && (b <= b' ' || b == 0x7f || b"\"'<>\\^`|}".contains(&b)) {
            return Err("it has a character a template cannot hold outside an expression");
        }
        i += 1;
    }
    Ok(())
}

/// Writes the regular expression of one expression (the text between `{` and `}`).
fn write_expression(out: &mut String, body: &str) -> Result<(), &'static str> {
    let (op, list) = match body.chars().next() {
        Some(c) if "=,!@|".contains(c) => return Err("the expression's operator is reserved"),
        Some(c) => match operator(c) {
            Some(op) => (op, &body[1..]),
            None => (simple(), body),
        },
        None => return Err("an expression is empty"),
    };
    let vars = list
        .split(',')
        .map(varspec)
        .collect::<Result<Vec<_>, _>>()?;
    let exploded = vars.iter().any(|v| v.explode);
    if !op.first.is_empty() {
        out.push_str("(?:");
        out.push_str(&regex::escape(op.first));
    }
    out.push('(');
    write_class(out, op.reserved, op.named || vars[0].explode);
    if vars.len() > 1 || exploded {
        out.push_str("(?:");
        out.push_str(&regex::escape(op.separator));
        write_class(out, op.reserved, op.named || exploded);
        out.push(')');
        if exploded {
            out.push('*');
        } else {
            out.push_str(&format!("{{0,{}}}", vars.len() - 1));
        }
    }
    out.push(')');
    if !op.first.is_empty() {
        out.push(')');
    }
    out.push('?');
    Ok(())
}

/// The operator of an expression without one.
fn simple() -> Operator {
    Operator {
        first: "",
        separator: ",",
        named: false,
        reserved: false,
    }
}

/// One variable: a name of `ALPHA / DIGIT / _ / pct-encoded` characters (dots between them),
/// then `:<max length>` or `*`.
fn varspec(text: &str) -> Result<Varspec, &'static str> {
    let (name, explode) = match text.strip_suffix('*') {
        Some(name) => (name, true),
        None => match text.split_once(':') {
            Some((name, max)) => {
                let ok = !max.is_empty()
                    && max.len() <= 4
                    && max.bytes().all(|b| b.is_ascii_digit())
                    && !max.starts_with('0')
                    && max.parse::<u32>().is_ok_and(|m| m < 10_000);
                if !ok {
                    return Err("a prefix length is not a number from 1 to 9999");
                }
                (name, false)
            }
            None => (text, false),
        },
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes[0] == b'.' || bytes[bytes.len() - 1] == b'.' {
        return Err("a variable name is empty or starts or ends with `.`");
    }
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or("a bad percent-encoding in a name")?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err("a bad percent-encoding in a name");
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' => i += 1,
            _ => return Err("a variable name has a character names cannot have"),
        }
    }
    Ok(Varspec { explode })
}

/// The characters one value may expand to: unreserved (and reserved for `+` and `#`) or
/// percent-encoded; outside those operators also `,` (and `=` in named ones), as the template
/// library the reference hub uses allows.
fn write_class(out: &mut String, reserved: bool, named: bool) {
    out.push_str("(?:(?:[");
    if !reserved {
        out.push_str(r"\x2c");
        if named {
            out.push_str(r"\x3d");
        }
    }
    out.push_str(UNRESERVED);
    if reserved {
        out.push_str(RESERVED);
    }
    out.push_str("]|%[[:xdigit:]][[:xdigit:]])*)");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(selector: &str, topic: &str) -> bool {
        Selector::parse(selector).unwrap().matches(topic)
    }

    #[test]
    fn any_exact_and_templates() {
        assert!(matches("*", "https://example.com/anything"));
        assert!(matches(
            "https://example.com/books/1",
            "https://example.com/books/1"
        ));
        assert!(!matches(
            "https://example.com/books/1",
            "https://example.com/books/12"
        ));
        let books = "https://example.com/books/{id}";
        assert!(matches(books, "https://example.com/books/1"));
        assert!(matches(books, "https://example.com/books/"));
        assert!(matches(books, books), "a template matches its own text");
        assert!(!matches(books, "https://example.com/books/1/reviews"));
        assert!(!matches(books, "https://example.com/authors/1"));
        assert!(!matches(books, "xhttps://example.com/books/1"), "anchored");
        // Reserved expansion lets `/` through; simple expansion does not.
        assert!(matches(
            "https://example.com/{+path}",
            "https://example.com/a/b/c"
        ));
        assert!(!matches(
            "https://example.com/{path}",
            "https://example.com/a/b"
        ));
        assert!(matches(
            "https://example.com/{path}",
            "https://example.com/a%2Fb"
        ));
        // Path segments, dots and queries.
        assert!(matches(
            "https://example.com{/a,b}",
            "https://example.com/x/y"
        ));
        assert!(!matches(
            "https://example.com{/a,b}",
            "https://example.com/x/y/z"
        ));
        assert!(matches(
            "https://example.com{/list*}",
            "https://example.com/x/y/z"
        ));
        assert!(matches(
            "https://example.com/f{.ext}",
            "https://example.com/f.json"
        ));
        assert!(matches(
            "https://example.com/users/foo/{?topic}",
            "https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1"
        ));
        assert!(!matches(
            "https://example.com/users/foo/{?topic}",
            "https://example.com/users/bar/?topic=x"
        ));
        assert!(matches(
            "https://example.com/s{;x,y}",
            "https://example.com/s;x=1;y=2"
        ));
        assert!(matches(
            "https://example.com/s?a=1{&b}",
            "https://example.com/s?a=1&b=2"
        ));
        assert!(matches(
            "https://example.com/{#frag}",
            "https://example.com/#a/b"
        ));
        // Non-ASCII in literals matches itself; in a value only percent-encoded.
        assert!(matches(
            "https://example.com/ü/{x}",
            "https://example.com/ü/1"
        ));
        assert!(!matches("https://example.com/{x}", "https://example.com/ü"));
        assert!(matches(
            "https://example.com/{x}",
            "https://example.com/%C3%BC"
        ));
        // Literal regex characters stay literal.
        assert!(!matches(
            "https://example.com/a.b/{x}",
            "https://example.com/aXb/1"
        ));
    }

    #[test]
    fn broken_templates_are_refused_but_lenient_in_claims() {
        for bad in [
            "https://example.com/{id",
            "https://example.com/{}",
            "https://example.com/{=x}",
            "https://example.com/{a b}",
            "https://example.com/{x:0}",
            "https://example.com/{x:abc}",
            "https://example.com/{x}}",
            "https://example.com/a b/{x}",
            "https://example.com/%zz/{x}",
            "{.}",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} accepted");
            let lenient = Selector::lenient(bad);
            assert!(lenient.matches(bad), "{bad:?} is compared as it is");
            assert!(!lenient.matches("https://example.com/1"));
        }
        // Without `{`, anything is an exact topic.
        assert!(matches("a b}c", "a b}c"));
    }

    #[test]
    fn any_match_is_any_selector_against_any_topic() {
        let selectors = [
            Selector::parse("https://example.com/books/{id}").unwrap(),
            Selector::parse("urn:x").unwrap(),
        ];
        assert!(any_match(&selectors, ["nope", "urn:x"]));
        assert!(any_match(&selectors, ["https://example.com/books/7"]));
        assert!(!any_match(&selectors, ["nope", "urn:y"]));
        assert!(!any_match(&[], ["urn:x"]));
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_selectors_never_panic"))]
        #[test]
        fn hostile_selectors_never_panic(s in "[{}a-z0-9:/.,*+#;?&=%!@| \\x00-\\x1fü]{0,60}", t in "\\PC{0,40}") {
            if let Ok(selector) = Selector::parse(&s) {
                let _ = selector.matches(&t);
            }
            let _ = Selector::lenient(&s).matches(&t);
        }
    }
}
