use std::fmt;

use serde::{Deserialize, Serialize};

/// Device ids and metric names share one alphabet: safe in URLs, MQTT topics, logs and SQL identifiers
/// as data, and short enough to index cheaply.
const MAX_NAME_CHARS: usize = 64;

fn check_name(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_NAME_CHARS {
        return Err(format!("must be at most {MAX_NAME_CHARS} characters"));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "may contain only letters, digits, '.', '_' and '-' (found {bad:?})"
        ));
    }
    Ok(())
}

macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `value`; the error says why it is not acceptable.
            pub fn parse(value: impl Into<String>) -> Result<Self, String> {
                let value = value.into();
                $check(&value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(value: String) -> Result<Self, String> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

checked_string!(
    /// A device's id: 1–64 characters of `[A-Za-z0-9._-]`.
    DeviceId,
    check_name
);

checked_string!(
    /// A metric's name (`temperature`, `co2`): 1–64 characters of `[A-Za-z0-9._-]`.
    MetricName,
    check_name
);

checked_string!(
    /// Identifies a reading among its device's readings: chosen by the device (so that a retry carries
    /// the same id) or assigned at ingest as a UUIDv7. 1–64 printable ASCII characters, no spaces.
    ReadingId,
    check_reading_id
);

/// Reading ids are shown to people (dashboards, exports, logs), so every character must be one that
/// looks like itself: printable ASCII (`!` to `~`) only. Anything else can spoof what is displayed:
/// bidi controls reorder the text around them, zero-width characters hide, spaces and look-alike
/// letters from other scripts (Cyrillic `а` for Latin `a`) make two different ids look the same. All of
/// ASCII's punctuation stays allowed because devices build ids from timestamps (`:`, `+`, `.`),
/// counters (`#`) and encodings (`/`, `=`), and UUIDs are letters, digits and `-`.
fn check_reading_id(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "may contain only printable ASCII characters without spaces, '!' to '~' (found {bad:?})"
        ));
    }
    // ASCII only from here: bytes are characters
    if value.len() > MAX_NAME_CHARS {
        return Err(format!("must be at most {MAX_NAME_CHARS} characters"));
    }
    Ok(())
}

impl ReadingId {
    /// A new server-assigned id. UUIDv7 ids sort by creation time, which keeps index inserts local.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_accept_the_documented_alphabet() {
        for ok in ["raspi-01", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(DeviceId::parse(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn device_ids_refuse_everything_else() {
        for bad in [
            "",
            "has space",
            "slash/y",
            "plus+",
            "ümlaut",
            &"x".repeat(65),
            "#",
            "a\n",
        ] {
            assert!(DeviceId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn reading_ids_allow_printable_ascii_up_to_64_chars() {
        for ok in [
            "2026-11-25T10:00:00Z#7",
            "2026-11-25T19:00:00.123+09:00",
            "raspi-01-000042",
            "0192f0c4-5f6e-7a3b-8c1d-2e3f4a5b6c7d",
            "YWJj/ZA==",
            "!~",
            &"x".repeat(64),
        ] {
            assert!(ReadingId::parse(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn reading_ids_refuse_what_could_spoof_a_display() {
        for bad in [
            "",
            &"x".repeat(65),
            "a\u{0}b",
            "has space",
            "tab\there",
            "ü",
            "r\u{202E}gnp.exe", // right-to-left override
            "ab\u{200B}c",      // zero-width space
            "\u{2066}isolate",  // left-to-right isolate
            "\u{FEFF}bom",      // zero-width no-break space
            "p\u{0430}ypal",    // Cyrillic a
            "nbsp\u{00A0}",
            "del\u{7F}",
        ] {
            let err = ReadingId::parse(bad).expect_err(bad);
            assert!(!err.is_empty());
        }
        let err = ReadingId::parse("ab\u{200B}c").unwrap_err();
        assert!(err.contains("printable ASCII"), "{err}");
        assert!(
            err.contains("\\u{200b}"),
            "the offending character is named: {err}"
        );
    }

    #[test]
    fn generated_reading_ids_are_valid_and_distinct() {
        let a = ReadingId::generate();
        let b = ReadingId::generate();
        assert_ne!(a, b);
        assert!(ReadingId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn deserializing_checks_the_value() {
        assert!(serde_json::from_str::<DeviceId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<DeviceId>("\"not ok\"").is_err());
    }
}
