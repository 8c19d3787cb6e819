//! Names of keys and channels, and reading a channel name back.
//!
//! Every name a topic uses carries the topic as a hash tag (`{topic}`), so in a Redis Cluster
//! they all live in the topic's slot: one script touches them together, and the topic's sharded
//! channel and keyspace notifications come from the node that owns its stream.

/// What follows the topic's hash tag in its live channel's name.
pub(super) const LIVE: &str = ":live";
/// … in its tombstone key's name.
pub(super) const TOMBSTONE: &str = ":last";
/// … in its idempotency keys' names, before the publisher's key.
pub(super) const IDEMPOTENCY: &str = ":idem:";
/// … in its presence hash's name (its entries, see `presence`).
pub(super) const PRESENCE: &str = ":presence";
/// … in its label streams' names, before the label.
pub(super) const LABEL: &str = ":label:";

/// Key and channel names for one deployment.
#[derive(Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
    /// `__keyspace@<db>__:<prefix>:{`: how keyspace notification channels for our streams start.
    pub(super) keyspace_head: String,
}

/// Which message a channel carries, and for which topic.
pub(super) enum Channel<'a> {
    Live(&'a str),
    Keyspace(&'a str),
}

impl Keys {
    pub(super) fn new(prefix: &str, db: i64) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
            keyspace_head: format!("__keyspace@{db}__:{prefix}:{{"),
        }
    }

    pub(super) fn stream(&self, topic: &str) -> String {
        self.name(topic, "")
    }

    pub(super) fn live_channel(&self, topic: &str) -> String {
        self.name(topic, LIVE)
    }

    pub(super) fn keyspace_channel(&self, topic: &str) -> String {
        format!("{}{}}}", self.keyspace_head, topic)
    }

    /// An expired stream's last id, kept as long again, for the gap rule.
    pub(super) fn tombstone(&self, topic: &str) -> String {
        self.name(topic, TOMBSTONE)
    }

    /// A shared list ([`Store::file_until`](crate::store::Store::file_until)):
    /// `<prefix>:list:{<name>}`, outside every topic's names.
    pub(super) fn list(&self, name: &str) -> String {
        format!("{}:list:{{{name}}}", self.prefix)
    }

    /// A `SCAN MATCH` pattern for every key of the topic but its stream
    /// (`<prefix>:{<topic>}:*`), glob characters in the topic escaped.
    pub(super) fn others_pattern(&self, topic: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + topic.len() + 8);
        for c in self.prefix.chars().chain([':', '{']).chain(topic.chars()) {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push_str("}:*");
        out
    }

    /// `<prefix>:{<topic>}<suffix>`, the shape of every name a topic uses, written into `out`
    /// (cleared first): the publish path reuses one buffer for all the names of a call.
    pub(super) fn write_name(&self, out: &mut String, topic: &str, suffix: &str) {
        out.clear();
        out.reserve(self.prefix.len() + topic.len() + suffix.len() + 3);
        out.push_str(&self.prefix);
        out.push_str(":{");
        out.push_str(topic);
        out.push('}');
        out.push_str(suffix);
    }

    fn name(&self, topic: &str, suffix: &str) -> String {
        let mut name = String::new();
        self.write_name(&mut name, topic, suffix);
        name
    }

    pub(super) fn parse_channel<'a>(&self, channel: &'a str) -> Option<Channel<'a>> {
        if let Some(rest) = channel.strip_prefix(self.keyspace_head.as_str()) {
            return rest.strip_suffix('}').map(Channel::Keyspace);
        }
        let rest = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?;
        rest.strip_suffix(LIVE)?
            .strip_suffix('}')
            .map(Channel::Live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn channels_parse_back_to_topics() {
        let keys = Keys::new("ssegate", 0);
        assert_eq!(keys.stream("a.b"), "ssegate:{a.b}");
        assert_eq!(keys.tombstone("a.b"), "ssegate:{a.b}:last");
        let mut name = String::from("left over");
        keys.write_name(&mut name, "a.b", IDEMPOTENCY);
        assert_eq!(name, "ssegate:{a.b}:idem:");
        assert!(matches!(
            keys.parse_channel(&keys.live_channel("a:live")),
            Some(Channel::Live("a:live"))
        ));
        assert!(matches!(
            keys.parse_channel(&keys.keyspace_channel("x")),
            Some(Channel::Keyspace("x"))
        ));
        assert!(keys.parse_channel("other:{x}:live").is_none());
        assert_eq!(keys.others_pattern("a.b"), "ssegate:{a.b}:*");
        assert_eq!(keys.others_pattern(r"x*[?]\y"), r"ssegate:{x\*\[\?\]\\y}:*");
    }

    #[test]
    fn a_topics_names_share_its_slot() {
        let keys = Keys::new("ssegate", 0);
        for topic in ["a", "user.42", "x:y"] {
            let slot = Slot::for_key(keys.stream(topic));
            for name in [
                keys.live_channel(topic),
                keys.keyspace_channel(topic),
                keys.tombstone(topic),
                {
                    let mut name = String::new();
                    keys.write_name(&mut name, topic, IDEMPOTENCY);
                    name.push_str("k{1}");
                    name
                },
                {
                    let mut name = String::new();
                    keys.write_name(&mut name, topic, LABEL);
                    name.push_str("https://example.com/{id}");
                    name
                },
            ] {
                assert_eq!(Slot::for_key(&name), slot, "{name}");
            }
        }
    }
}
