//! The node's copy of the revocation list: tokens refused before their `exp`, by `jti`, or every
//! token of a `sub` issued up to a moment (by `iat`).
//!
//! The list itself is kept in the store, each entry until the longest a revoked token can still
//! live; every node holds it in memory, so checking a token costs two hash lookups (none while
//! the list is empty), never a round trip. [`crate::control`] keeps the copy in step: it applies
//! each revocation as it is announced, and reloads the whole list now and then in case an
//! announcement was missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use crate::event::unix_ms as now_ms;

/// One revocation, as filed in the store's list (`jti:<jti>`, `sub:<iat cutoff>:<sub>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The token with this `jti`.
    Token { jti: String },
    /// Every token of `sub` whose `iat` is at or before `issued_until` (unix seconds); one
    /// without `iat` too, as it cannot say when it was issued.
    Subject { sub: String, issued_until: u64 },
}

impl Revocation {
    /// The entry's text in the store's list.
    pub fn entry(&self) -> String {
        match self {
            Revocation::Token { jti } => format!("jti:{jti}"),
            Revocation::Subject { sub, issued_until } => format!("sub:{issued_until}:{sub}"),
        }
    }

    /// Reads an entry back; `None` for text that is not one.
    pub fn parse(entry: &str) -> Option<Revocation> {
        if let Some(jti) = entry.strip_prefix("jti:") {
            return Some(Revocation::Token {
                jti: jti.to_owned(),
            });
        }
        let (cutoff, sub) = entry.strip_prefix("sub:")?.split_once(':')?;
        Some(Revocation::Subject {
            sub: sub.to_owned(),
            issued_until: cutoff.parse().ok()?,
        })
    }

    /// Whether a token with these claims is revoked by this entry.
    pub fn covers(&self, jti: Option<&str>, sub: Option<&str>, iat: Option<u64>) -> bool {
        match self {
            Revocation::Token { jti: revoked } => jti == Some(revoked.as_str()),
            Revocation::Subject {
                sub: revoked,
                issued_until,
            } => sub == Some(revoked.as_str()) && iat.is_none_or(|iat| iat <= *issued_until),
        }
    }
}

/// The revocations in force on this node.
#[derive(Default)]
pub struct Revocations {
    /// Whether the list holds anything: the check of every token reads only this then.
    any: AtomicBool,
    list: RwLock<List>,
}

#[derive(Default)]
struct List {
    /// Revoked `jti` → until when (unix ms) the entry holds.
    tokens: HashMap<String, u64>,
    /// `sub` → the latest `iat` revoked and until when that holds.
    subjects: HashMap<String, (u64, u64)>,
}

impl Revocations {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, List> {
        self.list.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds one revocation holding until `until_ms`; whether it was new here.
    pub fn apply(&self, revocation: &Revocation, until_ms: u64) -> bool {
        if until_ms <= now_ms() {
            return false;
        }
        let mut list = self.write();
        let new = match revocation {
            Revocation::Token { jti } => {
                let slot = list.tokens.entry(jti.clone()).or_default();
                let new = *slot == 0;
                *slot = (*slot).max(until_ms);
                new
            }
            Revocation::Subject { sub, issued_until } => {
                let slot = list.subjects.entry(sub.clone()).or_default();
                let new = *issued_until > slot.0;
                slot.0 = slot.0.max(*issued_until);
                slot.1 = slot.1.max(until_ms);
                new
            }
        };
        self.any.store(true, Ordering::Release);
        new
    }

    /// Adds the store's list (entries and until when, unix ms) to this one, and drops what ran
    /// out: a revocation is never withdrawn, so merging keeps whatever was announced while the
    /// store was read. Answers the revocations that were new here.
    pub fn merge(&self, entries: &[(String, u64)]) -> Vec<Revocation> {
        let mut new = Vec::new();
        for (entry, until) in entries {
            if let Some(revocation) = Revocation::parse(entry) {
                if self.apply(&revocation, *until) {
                    new.push(revocation);
                }
            }
        }
        let now = now_ms();
        let mut list = self.write();
        list.tokens.retain(|_, until| *until > now);
        list.subjects.retain(|_, (_, until)| *until > now);
        if list.tokens.capacity() > 2 * list.tokens.len() + 64 {
            list.tokens.shrink_to_fit();
        }
        if list.subjects.capacity() > 2 * list.subjects.len() + 64 {
            list.subjects.shrink_to_fit();
        }
        self.any.store(
            !list.tokens.is_empty() || !list.subjects.is_empty(),
            Ordering::Release,
        );
        new
    }

    /// Whether a token with these claims is refused.
    pub fn revoked(&self, jti: Option<&str>, sub: Option<&str>, iat: Option<u64>) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        if let Some(jti) = jti {
            if list.tokens.get(jti).is_some_and(|until| *until > now) {
                return true;
            }
        }
        if let Some(sub) = sub {
            if let Some((issued_until, until)) = list.subjects.get(sub) {
                return *until > now && iat.is_none_or(|iat| iat <= *issued_until);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_and_cover_their_tokens() {
        let token = Revocation::Token { jti: "t-1".into() };
        let subject = Revocation::Subject {
            sub: "user:42".into(),
            issued_until: 1_000,
        };
        for r in [&token, &subject] {
            assert_eq!(Revocation::parse(&r.entry()).as_ref(), Some(r));
        }
        assert_eq!(Revocation::parse("other"), None);
        assert_eq!(Revocation::parse("sub:x:42"), None);
        assert!(token.covers(Some("t-1"), None, None));
        assert!(!token.covers(Some("t-2"), Some("t-1"), None));
        assert!(subject.covers(None, Some("user:42"), Some(1_000)));
        assert!(
            subject.covers(None, Some("user:42"), None),
            "no iat: cannot say"
        );
        assert!(
            !subject.covers(None, Some("user:42"), Some(1_001)),
            "issued after"
        );
        assert!(!subject.covers(None, Some("user:4"), Some(1)));
    }

    #[test]
    fn the_list_refuses_until_its_entries_run_out() {
        let list = Revocations::default();
        assert!(!list.revoked(Some("a"), Some("s"), Some(1)));
        let later = now_ms() + 60_000;
        let token = Revocation::Token { jti: "a".into() };
        assert!(list.apply(&token, later));
        assert!(!list.apply(&token, later), "known");
        assert!(list.revoked(Some("a"), None, None));
        assert!(!list.revoked(Some("b"), None, None));
        let subject = Revocation::Subject {
            sub: "s".into(),
            issued_until: 100,
        };
        assert_eq!(
            list.merge(&[
                (subject.entry(), later),
                (token.entry(), later),
                ("jti:gone".into(), now_ms() - 1),
                ("junk".into(), later),
            ]),
            std::slice::from_ref(&subject),
            "only the new one"
        );
        assert!(list.revoked(None, Some("s"), Some(100)));
        assert!(!list.revoked(None, Some("s"), Some(101)));
        assert!(!list.revoked(Some("gone"), None, None), "ran out");
        let earlier = Revocation::Subject {
            sub: "s".into(),
            issued_until: 50,
        };
        assert!(
            !list.apply(&earlier, later),
            "an earlier cutoff adds nothing"
        );
        assert!(list.revoked(None, Some("s"), Some(100)));
    }
}
