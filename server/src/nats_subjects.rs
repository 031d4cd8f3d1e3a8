//! NATS subject names of the transport and the escaping of model / routing-group names into
//! subject tokens.
//!
//! Subjects (prefix `kvindex` by default):
//! * `<prefix>.events.<model>.<group>`: events of partition `(model, group)`;
//! * `<prefix>.query.<model>.<group>`: token queries (`POST /query` bodies);
//! * `<prefix>.query_by_hash.<model>.<group>`: local-hash queries (`POST /query_by_hash`).
//!
//! A name becomes one token: the bytes `%`, `.`, `*`, `>`, ASCII whitespace and control
//! characters, and every non-ASCII byte are written `%XX` (two upper-case hex digits of the
//! UTF-8 byte); everything else is kept. `Qwen/Qwen3-0.6B` → `Qwen/Qwen3-0%2E6B`. Decoding
//! accepts either hex case and refuses a `%` not followed by two hex digits or a result that
//! is not UTF-8. Names must be non-empty (NATS has no empty tokens).

use kvindex_engine::NamespaceKey;
use thiserror::Error;

/// Why a subject does not name a partition.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubjectError {
    #[error("subject `{0}` is not `<prefix>.<kind>.<model>.<routing_group>`")]
    Shape(String),
    #[error("subject token `{0}` has a bad `%` escape (expected %XX, two hex digits)")]
    Escape(String),
    #[error("subject token `{0}` does not decode to UTF-8")]
    Utf8(String),
}

/// Which query a request subject asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// `POST /query` semantics (token ids).
    Tokens,
    /// `POST /query_by_hash` semantics (local block hashes).
    Hashes,
}

impl QueryKind {
    /// Metric label / subject kind token.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryKind::Tokens => "query",
            QueryKind::Hashes => "query_by_hash",
        }
    }
}

fn must_escape(b: u8) -> bool {
    matches!(b, b'%' | b'.' | b'*' | b'>')
        || b.is_ascii_whitespace()
        || b.is_ascii_control()
        || b >= 0x80
}

/// One subject token for a model or routing-group name.
pub fn encode_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if must_escape(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// The name a subject token stands for.
pub fn decode_token(token: &str) -> Result<String, SubjectError> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| SubjectError::Escape(token.to_owned()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| SubjectError::Utf8(token.to_owned()))
}

/// The subject layout under one prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (validated by the config).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Subscription of every event subject.
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// Subscription of one query kind, every partition.
    pub fn query_wildcard(&self, kind: QueryKind) -> String {
        format!("{}.{}.*.*", self.prefix, kind.as_str())
    }

    /// The event subject of a partition.
    pub fn events(&self, model: &str, group: &str) -> String {
        format!(
            "{}.events.{}.{}",
            self.prefix,
            encode_token(model),
            encode_token(group)
        )
    }

    /// The query subject of a partition.
    pub fn query(&self, kind: QueryKind, model: &str, group: &str) -> String {
        format!(
            "{}.{}.{}.{}",
            self.prefix,
            kind.as_str(),
            encode_token(model),
            encode_token(group)
        )
    }

    /// The partition named by `<prefix>.<kind>.<model>.<group>`.
    fn partition(&self, kind: &str, subject: &str) -> Result<NamespaceKey, SubjectError> {
        let shape = || SubjectError::Shape(subject.to_owned());
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_prefix(kind))
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(shape)?;
        let mut tokens = rest.split('.');
        let (Some(model), Some(group), None) = (tokens.next(), tokens.next(), tokens.next()) else {
            return Err(shape());
        };
        if model.is_empty() || group.is_empty() {
            return Err(shape());
        }
        Ok(NamespaceKey::new(
            decode_token(model)?,
            decode_token(group)?,
        ))
    }

    /// The partition of an event subject.
    pub fn parse_events(&self, subject: &str) -> Result<NamespaceKey, SubjectError> {
        self.partition("events", subject)
    }

    /// The partition of a query subject.
    pub fn parse_query(
        &self,
        kind: QueryKind,
        subject: &str,
    ) -> Result<NamespaceKey, SubjectError> {
        self.partition(kind.as_str(), subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_dots_wildcards_and_unicode_round_trip() {
        for name in [
            "default",
            "Qwen/Qwen3-0.6B",
            "a.b.c",
            "100%",
            "*",
            ">",
            "with space",
            "tab\there",
            "модель",
            "m:g",
        ] {
            let token = encode_token(name);
            assert!(
                !token.contains(['.', '*', '>', ' ', '\t']) && token.is_ascii(),
                "{name:?} -> {token:?}"
            );
            assert_eq!(decode_token(&token).unwrap(), name);
        }
        assert_eq!(encode_token("Qwen/Qwen3-0.6B"), "Qwen/Qwen3-0%2E6B");
        assert_eq!(decode_token("a%2eb").unwrap(), "a.b");
    }

    #[test]
    fn bad_escapes_are_refused() {
        assert!(matches!(decode_token("a%2"), Err(SubjectError::Escape(_))));
        assert!(matches!(decode_token("a%zz"), Err(SubjectError::Escape(_))));
        assert!(matches!(decode_token("%FF"), Err(SubjectError::Utf8(_))));
    }

    #[test]
    fn subjects_parse_back_to_their_partition() {
        let s = Subjects::new("kv.prod");
        let subject = s.events("Qwen/Qwen3-0.6B", "g 1");
        assert_eq!(subject, "kv.prod.events.Qwen/Qwen3-0%2E6B.g%201");
        assert_eq!(
            s.parse_events(&subject).unwrap(),
            NamespaceKey::new("Qwen/Qwen3-0.6B", "g 1")
        );
        let q = s.query(QueryKind::Hashes, "m", "default");
        assert_eq!(q, "kv.prod.query_by_hash.m.default");
        assert_eq!(
            s.parse_query(QueryKind::Hashes, &q).unwrap(),
            NamespaceKey::new("m", "default")
        );
        assert_eq!(s.events_wildcard(), "kv.prod.events.>");
        assert_eq!(s.query_wildcard(QueryKind::Tokens), "kv.prod.query.*.*");
        for bad in [
            "kv.prod.events.m",
            "kv.prod.events.m.g.x",
            "kv.prod.events",
            "kv.other.events.m.g",
            "kv.prod.query.m.g",
            "kv.prodevents.m.g",
        ] {
            assert!(
                matches!(s.parse_events(bad), Err(SubjectError::Shape(_))),
                "{bad}"
            );
        }
    }
}
