//! Parsing of human-friendly quantities: durations (`3s`, `250ms`), rates (`100k`, `1.5M`) and
//! size ranges (`32`, `16..64`), shared by the CLI and the TOML workload file.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::LoadgenError;

/// Parses `1.5s`, `250ms`, `40us`, `2m`, `100ns` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, LoadgenError> {
    let t = text.trim();
    let bad = || LoadgenError::Parse {
        what: "duration",
        input: text.to_owned(),
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0s".to_owned()
    } else if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

/// Parses a count or rate with an optional `k`/`M`/`G` suffix: `250000`, `250k`, `1.2M`.
pub fn parse_count(text: &str) -> Result<f64, LoadgenError> {
    let t = text.trim();
    let bad = || LoadgenError::Parse {
        what: "number",
        input: text.to_owned(),
    };
    let (num, scale) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    Ok(v * scale)
}

/// clap value parser for [`Duration`] flags.
pub fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

/// clap value parser for rates and counts with suffixes.
pub fn count_arg(text: &str) -> Result<f64, String> {
    parse_count(text).map_err(|e| e.to_string())
}

/// A duration that (de)serializes as a string such as `"10s"` in TOML and JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Secs(f64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Secs(s) if s >= 0.0 && s.is_finite() => Ok(Self(Duration::from_secs_f64(s))),
            Repr::Secs(s) => Err(serde::de::Error::custom(format!("bad duration {s}"))),
            Repr::Text(t) => parse_duration(&t)
                .map(Self)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// An inclusive size range in bytes; `min == max` means a fixed size.
/// Written as `32` or `"16..64"` (uniformly distributed, both ends included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeRange {
    /// Smallest size.
    pub min: usize,
    /// Largest size (inclusive).
    pub max: usize,
}

impl SizeRange {
    /// A fixed size.
    pub const fn fixed(n: usize) -> Self {
        Self { min: n, max: n }
    }

    /// True when every draw gives the same size.
    pub fn is_fixed(&self) -> bool {
        self.min == self.max
    }

    /// Parses `32` or `16..64` (also `16-64`).
    pub fn parse(text: &str) -> Result<Self, LoadgenError> {
        let bad = || LoadgenError::Parse {
            what: "size or size range",
            input: text.to_owned(),
        };
        let t = text.trim();
        let (a, b) = match t.split_once("..") {
            Some((a, b)) => (a, b.trim_start_matches('=')),
            None => match t.split_once('-') {
                Some((a, b)) => (a, b),
                None => (t, t),
            },
        };
        let min = parse_count(a)? as usize;
        let max = parse_count(b)? as usize;
        if min > max {
            return Err(bad());
        }
        Ok(Self { min, max })
    }
}

impl fmt::Display for SizeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_fixed() {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

impl Serialize for SizeRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_fixed() {
            s.serialize_u64(self.min as u64)
        } else {
            s.serialize_str(&self.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for SizeRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Fixed(u64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Fixed(n) => Ok(Self::fixed(n as usize)),
            Repr::Text(t) => Self::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// clap value parser for [`SizeRange`] flags.
pub fn size_arg(text: &str) -> Result<SizeRange, String> {
    SizeRange::parse(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_round_trip() {
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("40us").unwrap(), Duration::from_micros(40));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        for d in ["3s", "250ms", "40us", "7ns"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn counts_take_suffixes() {
        assert_eq!(parse_count("250k").unwrap(), 250_000.0);
        assert_eq!(parse_count("1.5M").unwrap(), 1_500_000.0);
        assert_eq!(parse_count("42").unwrap(), 42.0);
        assert!(parse_count("-1").is_err());
    }

    #[test]
    fn size_ranges() {
        assert_eq!(SizeRange::parse("32").unwrap(), SizeRange::fixed(32));
        assert_eq!(
            SizeRange::parse("16..64").unwrap(),
            SizeRange { min: 16, max: 64 }
        );
        assert_eq!(
            SizeRange::parse("1k-2k").unwrap(),
            SizeRange {
                min: 1000,
                max: 2000
            }
        );
        assert!(SizeRange::parse("64..16").is_err());
    }
}
