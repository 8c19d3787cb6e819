//! Topic patterns in token claims and in `auth.anonymous_subscribe`.
//!
//! A pattern is an exact topic, or contains `*`, which matches any run of characters (the empty
//! run too): `*` matches every topic, `user.42.*` every topic starting `user.42.`.
//!
//! Written here rather than taken from a glob crate: glob crates also give `?`, `[` and `\` a
//! meaning, and all three are ordinary characters in topic names.

/// Whether `topic` matches `pattern`.
///
/// Runs in O(len(pattern) × len(topic)) at worst, without recursion, so a hostile pattern in a
/// token cannot blow the stack or take long: both sides are at most a few hundred bytes.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), topic.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the topic position it is currently stretched to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = star {
            // Let the last `*` swallow one more character and try again after it.
            pi = star_pi + 1;
            ti = star_ti + 1;
            star = Some((star_pi, star_ti + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Whether any of `patterns` matches `topic`.
pub fn any_matches<S: AsRef<str>>(patterns: &[S], topic: &str) -> bool {
    patterns.iter().any(|p| matches(p.as_ref(), topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_star_patterns() {
        assert!(matches("news", "news"));
        assert!(!matches("news", "news2"));
        assert!(!matches("news2", "news"));
        assert!(matches("*", "anything.at-all"));
        assert!(matches("user.42.*", "user.42.orders"));
        assert!(matches("user.42.*", "user.42."));
        assert!(!matches("user.42.*", "user.421"));
        assert!(!matches("user.42.*", "user.4"));
        assert!(matches("*.orders", "user.42.orders"));
        assert!(!matches("*.orders", "user.42.orders.x"));
        assert!(matches("a*b*c", "a-x-b-y-b-c"));
        assert!(!matches("a*b*c", "a-x-c-b"));
        assert!(matches("**", ""));
        assert!(!matches("", "a"));
        // `?` and `[` are ordinary characters.
        assert!(matches("a?b", "a?b"));
        assert!(!matches("a?b", "axb"));
        assert!(matches("[x]", "[x]"));
        assert!(!matches("[x]", "x"));
    }

    #[test]
    fn any_of_a_list() {
        assert!(any_matches(&["a", "b.*"], "b.c"));
        assert!(!any_matches(&["a", "b.*"], "c"));
        assert!(!any_matches::<&str>(&[], "a"));
    }

    /// The plain recursive definition, as a reference for the iterative matcher.
    fn reference(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("patterns_match_like_the_reference"))]
        /// A small alphabet, so that stars and matches are frequent.
        #[test]
        fn patterns_match_like_the_reference(p in "[ab.*]{0,12}", t in "[ab.]{0,16}") {
            proptest::prop_assert_eq!(matches(&p, &t), reference(p.as_bytes(), t.as_bytes()));
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_patterns_never_panic"))]
        #[test]
        fn hostile_patterns_never_panic(p in "\\PC{0,300}", t in "[!-~]{0,256}") {
            let _ = matches(&p, &t);
            proptest::prop_assert!(matches("*", &t));
            if !t.contains('*') {
                proptest::prop_assert!(matches(&t, &t));
            }
        }
    }
}
