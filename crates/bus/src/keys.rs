//! Stream and key names.

use crate::codec::BusError;

/// A validated session id: 1–64 characters of `[A-Za-z0-9_-]`, so it can never
/// break out of a key's hash tag or collide with another key's layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// Validates `id`.
    pub fn parse(id: &str) -> Result<Self, BusError> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err(BusError::InvalidId(id.chars().take(80).collect()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Names of every stream and key, under one prefix so several fleets can share
/// a Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self {
            prefix: "nexus".into(),
        }
    }
}

impl Keys {
    /// Keys under `prefix` (letters, digits, `-`, `_`, `.`).
    pub fn new(prefix: &str) -> Result<Self, BusError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Self {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(BusError::InvalidPrefix(prefix.to_owned()))
        }
    }

    /// Work stream of a stage (`audio`, `encoded`, `codes`, `control`), split into
    /// `partitions` so a cluster spreads the load; `partition` picks one.
    pub fn stage_stream(&self, stage: &str, partition: u32) -> String {
        format!("{}:stage:{{{stage}.{partition}}}", self.prefix)
    }

    /// Ordered result log of one session; clients resume from an entry id in it.
    pub fn results(&self, session: &SessionId) -> String {
        format!("{}:{{s.{session}}}:results", self.prefix)
    }

    /// Hash holding a session's state (config, owner, last sequence).
    pub fn session(&self, session: &SessionId) -> String {
        format!("{}:{{s.{session}}}:state", self.prefix)
    }

    /// A record of a batch job: `part` is `status`, `spec`, `audio`, `result`,
    /// `cancel` or `runner`; all parts of a job share one hash tag.
    pub fn job(&self, job: &SessionId, part: &str) -> String {
        format!("{}:{{j.{job}}}:{part}", self.prefix)
    }

    /// The job a tenant's idempotency key names.
    pub fn job_idempotency(&self, tenant: &str, key: &str) -> String {
        format!("{}:jobkey:{tenant}:{key}", self.prefix)
    }

    /// Dead-letter stream of a stage: entries that failed too many deliveries.
    pub fn dead_letter(&self, stage: &str) -> String {
        format!("{}:dead:{{{stage}}}", self.prefix)
    }

    /// The decoders' model catalog (`ModelCatalog`): what each served model
    /// can do, as the replicas that loaded it advertise.
    pub fn catalog(&self) -> String {
        format!("{}:catalog", self.prefix)
    }

    /// Capacity pool of a stage (e.g. `decoder` sessions): the nodes that serve
    /// it and the leases on its slots live under this one hash tag.
    pub fn pool(&self, stage: &str) -> String {
        format!("{}:pool:{{{stage}}}", self.prefix)
    }
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of the hash tag, mod 16384).
pub fn hash_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&len| len > 0)
                .map(|len| &rest[..len])
        })
        .unwrap_or(bytes);
    crc16_xmodem(tagged) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_validated() {
        assert!(SessionId::parse("a1-B_2").is_ok());
        for bad in ["", "a}b", "a{b", "a b", "é", &"x".repeat(65)] {
            let e = SessionId::parse(bad).unwrap_err();
            assert!(e.to_string().contains("letters, digits"), "{e}");
        }
        assert!(Keys::new("prod-eu.1").is_ok());
        assert!(Keys::new("a:b").is_err());
    }

    #[test]
    fn a_session_keys_share_one_slot() {
        let k = Keys::default();
        let s = SessionId::parse("meeting-42").unwrap();
        assert_eq!(k.results(&s), "nexus:{s.meeting-42}:results");
        assert_eq!(hash_slot(&k.results(&s)), hash_slot(&k.session(&s)));
        assert_ne!(
            hash_slot(&k.stage_stream("audio", 0)),
            hash_slot(&k.stage_stream("audio", 1))
        );
    }

    #[test]
    fn hash_slot_matches_redis_cluster_spec() {
        // Reference values from the Redis Cluster specification / CLUSTER KEYSLOT.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(hash_slot("foo"), 12182);
        assert_eq!(
            hash_slot("{user1000}.following"),
            hash_slot("{user1000}.followers")
        );
        assert_eq!(hash_slot("foo{}{bar}"), hash_slot("foo{}{bar}"));
        assert_eq!(hash_slot("{}foo"), crc16_xmodem(b"{}foo") % 16384);
    }
}
