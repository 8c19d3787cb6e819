//! Names of keys and channels, and reading a channel name back.
//!
//! Every name a topic uses carries the topic as a hash tag (`{topic}`), so in a Redis Cluster
//! they all live in the topic's slot: one script touches them together, and the topic's sharded
//! channel and keyspace notifications come from the node that owns its stream.

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
        format!("{}:{{{}}}", self.prefix, topic)
    }

    pub(super) fn live_channel(&self, topic: &str) -> String {
        format!("{}:{{{}}}:live", self.prefix, topic)
    }

    pub(super) fn keyspace_channel(&self, topic: &str) -> String {
        format!("{}{}}}", self.keyspace_head, topic)
    }

    /// An expired stream's last id, kept as long again, for the gap rule.
    pub(super) fn tombstone(&self, topic: &str) -> String {
        format!("{}:{{{}}}:last", self.prefix, topic)
    }

    pub(super) fn idempotency(&self, topic: &str, key: &str) -> String {
        format!("{}:{{{}}}:idem:{}", self.prefix, topic, key)
    }

    pub(super) fn parse_channel<'a>(&self, channel: &'a str) -> Option<Channel<'a>> {
        if let Some(rest) = channel.strip_prefix(self.keyspace_head.as_str()) {
            return rest.strip_suffix('}').map(Channel::Keyspace);
        }
        let rest = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?;
        rest.strip_suffix("}:live").map(Channel::Live)
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
        assert!(matches!(
            keys.parse_channel(&keys.live_channel("a:live")),
            Some(Channel::Live("a:live"))
        ));
        assert!(matches!(
            keys.parse_channel(&keys.keyspace_channel("x")),
            Some(Channel::Keyspace("x"))
        ));
        assert!(keys.parse_channel("other:{x}:live").is_none());
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
                keys.idempotency(topic, "k{1}"),
            ] {
                assert_eq!(Slot::for_key(&name), slot, "{name}");
            }
        }
    }
}
