//! Template names: the only way a caller's string reaches a file name in the store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::StoreError;

/// Longest name accepted; also the capacity of the inline string.
pub const MAX_NAME_LEN: usize = 48;

/// A validated template name matching `[a-z0-9_-]{1,48}`.
///
/// No `/`, `.` or anything else that a path could use to climb out of the
/// store directory can get in, so `TemplateStore` can join it to its directory
/// without further checks.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateName(heapless::String<MAX_NAME_LEN>);

impl TemplateName {
    pub fn new(name: &str) -> Result<Self, StoreError> {
        let bad = |reason| StoreError::BadName {
            name: shorten(name),
            reason,
        };
        if name.is_empty() {
            return Err(bad("a name must not be empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad("a name must be at most 48 characters long"));
        }
        if !name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
        {
            return Err(bad(
                "a name may only use lowercase letters a-z, digits 0-9, '_' and '-'",
            ));
        }
        // Cannot fail after the length check; mapped anyway so nothing here panics.
        heapless::String::try_from(name)
            .map(Self)
            .map_err(|_| bad("a name must be at most 48 characters long"))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// Keeps error messages short when someone passes a huge string as a name.
fn shorten(name: &str) -> String {
    const KEEP: usize = 64;
    match name.char_indices().nth(KEEP) {
        Some((cut, _)) => format!("{}...", name.get(..cut).unwrap_or_default()),
        None => name.to_owned(),
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for TemplateName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl FromStr for TemplateName {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for TemplateName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TemplateName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_whole_alphabet() {
        let n = TemplateName::new("abc-xyz_0129").unwrap();
        assert_eq!(n.as_str(), "abc-xyz_0129");
        assert_eq!(n.to_string(), "abc-xyz_0129");
    }

    #[test]
    fn rejects_with_reason() {
        for bad in ["", "A", "a.b", "../x", "/etc/passwd", "é", "a b", "a\nb"] {
            let e = TemplateName::new(bad).unwrap_err();
            assert!(matches!(e, StoreError::BadName { .. }), "{bad:?}: {e}");
            assert!(
                !e.to_string().contains('\n'),
                "{bad:?}: message must be one line"
            );
        }
        assert!(TemplateName::new(&"a".repeat(49)).is_err());
        assert!(TemplateName::new(&"a".repeat(48)).is_ok());
    }

    #[test]
    fn huge_bad_name_gives_short_message() {
        let e = TemplateName::new(&"é".repeat(10_000)).unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
    }

    #[test]
    fn serde_validates() {
        let n: TemplateName = serde_json::from_str("\"ok-1\"").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"ok-1\"");
        assert!(serde_json::from_str::<TemplateName>("\"../x\"").is_err());
        // Escaped strings cannot be borrowed; they must still validate.
        assert!(serde_json::from_str::<TemplateName>("\"a\\/b\"").is_err());
        let n: TemplateName = serde_json::from_str("\"a\\u002db\"").unwrap();
        assert_eq!(n.as_str(), "a-b");
    }
}
