//! [`HumanBytes`]: a size written as `"16MiB"`, `"512KiB"` or a plain number of bytes.

use std::{fmt, str::FromStr};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, read from text such as `"16MiB"` (or a number) and written back as text.
///
/// ```
/// use router_config::HumanBytes;
/// let s: HumanBytes = "16MiB".parse().unwrap();
/// assert_eq!(s.0, 16 << 20);
/// assert_eq!(s.to_string(), "16MiB");
/// assert!("lots".parse::<HumanBytes>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanBytes(pub u64);

const UNITS: [(&str, u64); 4] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

impl FromStr for HumanBytes {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let factor = match unit.trim() {
            "" => Some(1),
            unit => UNITS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(unit))
                .map(|&(_, factor)| factor),
        };
        number
            .parse::<u64>()
            .ok()
            .zip(factor)
            .and_then(|(n, f)| n.checked_mul(f))
            .map(HumanBytes)
            .ok_or_else(|| format!("expected a size like \"16MiB\", got \"{text}\""))
    }
}

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, factor) = UNITS
            .iter()
            .find(|&&(_, factor)| self.0 >= factor && self.0.is_multiple_of(factor))
            .copied()
            .unwrap_or(("B", 1));
        write!(f, "{}{unit}", self.0 / factor)
    }
}

impl Serialize for HumanBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanBytes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like \"16MiB\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanBytes, E> {
                text.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<HumanBytes, E> {
                Ok(HumanBytes(bytes))
            }
            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<HumanBytes, E> {
                u64::try_from(bytes)
                    .map(HumanBytes)
                    .map_err(|_| E::custom(format!("expected a size, got {bytes}")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}
