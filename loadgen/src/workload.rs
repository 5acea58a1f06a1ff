//! The workload model: keyspace (key count, key and value sizes), key popularity, verb mix,
//! multi-get width, phases and load shape. Read from a commented TOML file and/or flags, validated
//! once, then turned into a [`RequestGen`] per worker.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::LoadgenError;
use crate::rng::Rng;
use crate::units::{HumanDuration, SizeRange};
use crate::zipf::Popularity;

/// memcached's key length limit (KEY_MAX_LENGTH).
pub const MAX_KEY_LEN: usize = 250;
/// Largest multi-get width accepted.
pub const MAX_WIDTH: usize = 100;
/// Most distinct keys: far beyond any memcached's memory, yet small enough that every key id,
/// count and sampler table stays exact (a value like 1e20 would saturate to u64::MAX).
pub const MAX_KEYS: u64 = 1_000_000_000;

/// A complete workload description; every field has a documented default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// Keys and values.
    pub keyspace: KeySpaceSpec,
    /// Which keys are asked for.
    pub popularity: PopularitySpec,
    /// Which verbs, and how many keys per GET.
    pub mix: Mix,
    /// Populate, warm-up, measurement.
    pub phases: Phases,
    /// Open or closed loop, rate, concurrency.
    pub load: LoadSpec,
    /// Seed of all random choices (keys, verbs, sizes, arrival gaps).
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            keyspace: KeySpaceSpec::default(),
            popularity: PopularitySpec::default(),
            mix: Mix::default(),
            phases: Phases::default(),
            load: LoadSpec::default(),
            seed: 1,
        }
    }
}

/// Key count and sizes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KeySpaceSpec {
    /// Number of distinct keys (default 100000).
    pub keys: u64,
    /// Key length in bytes, fixed (`16`) or a uniform range (`"16..64"`); default 16.
    pub key_size: SizeRange,
    /// Value length in bytes, fixed or a uniform range; default 32.
    pub value_size: SizeRange,
}

impl Default for KeySpaceSpec {
    fn default() -> Self {
        Self {
            keys: 100_000,
            key_size: SizeRange::fixed(16),
            value_size: SizeRange::fixed(32),
        }
    }
}

/// Key popularity.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PopularitySpec {
    /// `zipf` (default) or `uniform`.
    pub distribution: Distribution,
    /// Zipf skew θ (default 0.99, as YCSB and the BMC paper).
    pub theta: f64,
}

impl Default for PopularitySpec {
    fn default() -> Self {
        Self {
            distribution: Distribution::Zipf,
            theta: 0.99,
        }
    }
}

/// Key popularity distribution.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// P(rank k) ∝ k^-θ.
    Zipf,
    /// Every key equally likely.
    Uniform,
}

/// Verb mix: relative weights (they need not sum to 1) and the multi-get width.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Mix {
    /// Weight of GET (default 1).
    pub get: f64,
    /// Weight of SET (default 0).
    pub set: f64,
    /// Weight of DELETE (default 0).
    pub delete: f64,
    /// Keys per GET request (default 1); keys of one request that hash to different servers are
    /// sent as one request per server.
    pub multiget_width: usize,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            get: 1.0,
            set: 0.0,
            delete: 0.0,
            multiget_width: 1,
        }
    }
}

/// Phases of a run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Phases {
    /// SET every key once over TCP before the run (default true).
    pub populate: bool,
    /// Load applied but not recorded, before the measurement (default 1s).
    pub warmup: HumanDuration,
    /// Measured time (default 10s).
    pub duration: HumanDuration,
}

impl Default for Phases {
    fn default() -> Self {
        Self {
            populate: true,
            warmup: HumanDuration(Duration::from_secs(1)),
            duration: HumanDuration(Duration::from_secs(10)),
        }
    }
}

/// Open loop (arrivals at a rate, independent of replies) or closed loop (N outstanding).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    /// Requests at a target rate; latency measured from the intended send time.
    Open,
    /// A fixed number of outstanding requests per socket/connection.
    Closed,
}

/// Inter-arrival process of the open loop.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    /// Exponential gaps (a Poisson process).
    Poisson,
    /// Equal gaps.
    Fixed,
}

/// Load shape.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoadSpec {
    /// `open` or `closed` (default closed).
    pub mode: LoadMode,
    /// Open loop: total target rate in requests per second over all workers (default 100000).
    pub rate: f64,
    /// Open loop: `poisson` (default) or `fixed`.
    pub arrivals: Arrivals,
    /// Closed loop: outstanding requests per socket or connection (default 16).
    pub concurrency: usize,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            mode: LoadMode::Closed,
            rate: 100_000.0,
            arrivals: Arrivals::Poisson,
            concurrency: 16,
        }
    }
}

impl Workload {
    /// Reads a TOML workload file (all sections optional) and validates it.
    pub fn from_file(path: &Path) -> Result<Self, LoadgenError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadgenError::ReadWorkload {
            path: path.to_owned(),
            source,
        })?;
        let w: Self = toml::from_str(&text).map_err(|e| LoadgenError::ParseWorkload {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        w.validate()?;
        Ok(w)
    }

    /// Checks that the workload can be generated and is accepted by memcached.
    pub fn validate(&self) -> Result<(), LoadgenError> {
        let bad = |field, reason: String| Err(LoadgenError::Workload { field, reason });
        let ks = &self.keyspace;
        if ks.keys == 0 {
            return bad("keyspace.keys", "must be at least 1".into());
        }
        if ks.keys > MAX_KEYS {
            return bad(
                "keyspace.keys",
                format!("{} is more than the maximum of {MAX_KEYS} (1G)", ks.keys),
            );
        }
        let need = KeySpace::min_key_len(ks.keys);
        if ks.key_size.min < need {
            return bad(
                "keyspace.key_size",
                format!("{} keys need keys of at least {need} bytes", ks.keys),
            );
        }
        if ks.key_size.max > MAX_KEY_LEN {
            return bad(
                "keyspace.key_size",
                format!("memcached keys are at most {MAX_KEY_LEN} bytes"),
            );
        }
        if ks.value_size.max > 1 << 20 {
            return bad("keyspace.value_size", "at most 1 MiB".into());
        }
        let p = &self.popularity;
        if p.distribution == Distribution::Zipf && !(p.theta > 0.0 && p.theta < 10.0) {
            return bad("popularity.theta", format!("{} is not in (0, 10)", p.theta));
        }
        let m = &self.mix;
        if [m.get, m.set, m.delete]
            .iter()
            .any(|w| *w < 0.0 || !w.is_finite())
            || m.get + m.set + m.delete <= 0.0
        {
            return bad("mix", "weights must be >= 0 with a positive sum".into());
        }
        if m.multiget_width == 0 || m.multiget_width > MAX_WIDTH {
            return bad("mix.multiget_width", format!("must be in 1..={MAX_WIDTH}"));
        }
        if self.phases.duration.0.is_zero() {
            return bad("phases.duration", "must be positive".into());
        }
        let l = &self.load;
        if l.mode == LoadMode::Open && !(l.rate > 0.0 && l.rate.is_finite()) {
            return bad("load.rate", "must be positive in open loop".into());
        }
        if l.mode == LoadMode::Closed && (l.concurrency == 0 || l.concurrency > 16384) {
            return bad("load.concurrency", "must be in 1..=16384".into());
        }
        Ok(())
    }

    /// The popularity sampler for this workload.
    pub fn popularity(&self) -> Popularity {
        match self.popularity.distribution {
            Distribution::Uniform => Popularity::new(self.keyspace.keys, 0.0),
            Distribution::Zipf => Popularity::new(self.keyspace.keys, self.popularity.theta),
        }
    }
}

/// Key naming: key `id` is `k` followed by `id` in decimal, zero-padded to its length.
/// With a size range the length of each key is a fixed function of its id, so every run and
/// the populate phase agree on it.
#[derive(Clone, Debug)]
pub struct KeySpace {
    keys: u64,
    key_size: SizeRange,
    value_size: SizeRange,
}

impl KeySpace {
    /// Key prefix byte.
    pub const PREFIX: u8 = b'k';

    /// From a validated spec.
    pub fn new(spec: &KeySpaceSpec) -> Self {
        Self {
            keys: spec.keys,
            key_size: spec.key_size,
            value_size: spec.value_size,
        }
    }

    /// Number of keys.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// Shortest key able to name `keys` distinct keys.
    pub fn min_key_len(keys: u64) -> usize {
        1 + decimal_digits(keys.saturating_sub(1))
    }

    /// Length of key `id`.
    #[inline]
    pub fn key_len(&self, id: u64) -> usize {
        if self.key_size.is_fixed() {
            self.key_size.min
        } else {
            let span = (self.key_size.max - self.key_size.min + 1) as u64;
            // A cheap integer hash so lengths are not correlated with popularity rank.
            let h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
            self.key_size.min + (h % span) as usize
        }
    }

    /// Appends key `id` to `out`.
    #[inline]
    pub fn write_key(&self, id: u64, out: &mut Vec<u8>) {
        let len = self.key_len(id);
        let digits = decimal_digits(id);
        out.push(Self::PREFIX);
        out.extend(std::iter::repeat_n(b'0', len - 1 - digits));
        let start = out.len();
        out.resize(start + digits, b'0');
        let mut v = id;
        for slot in out[start..].iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }

    /// Key `id` as an owned byte string (convenience for tests and routing).
    pub fn key(&self, id: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.key_len(id));
        self.write_key(id, &mut v);
        v
    }

    /// One value length drawn from the value-size range.
    #[inline]
    pub fn value_len(&self, rng: &mut Rng) -> usize {
        if self.value_size.is_fixed() {
            self.value_size.min
        } else {
            rng.range_inclusive(self.value_size.min as u64, self.value_size.max as u64) as usize
        }
    }
}

fn decimal_digits(mut v: u64) -> usize {
    let mut d = 1;
    while v >= 10 {
        v /= 10;
        d += 1;
    }
    d
}

/// A memcached verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// get / mg.
    Get,
    /// set / ms.
    Set,
    /// delete / md.
    Delete,
}

/// One logical request: a verb, its keys (several only for a multi-get) and the value length.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Verb; `None` until filled.
    pub verb: Option<Verb>,
    /// Key ids.
    pub keys: Vec<u64>,
    /// Value length for SET.
    pub value_len: usize,
}

/// Draws requests for one worker.
#[derive(Clone, Debug)]
pub struct RequestGen {
    keyspace: KeySpace,
    popularity: Popularity,
    get_cut: f64,
    set_cut: f64,
    width: usize,
}

impl RequestGen {
    /// From a validated workload.
    pub fn new(w: &Workload) -> Self {
        let total = w.mix.get + w.mix.set + w.mix.delete;
        Self {
            keyspace: KeySpace::new(&w.keyspace),
            popularity: w.popularity(),
            get_cut: w.mix.get / total,
            set_cut: (w.mix.get + w.mix.set) / total,
            width: w.mix.multiget_width,
        }
    }

    /// The keyspace (for writing keys).
    pub fn keyspace(&self) -> &KeySpace {
        &self.keyspace
    }

    /// Fills `req` with the next request.
    #[inline]
    pub fn next(&mut self, rng: &mut Rng, req: &mut Request) {
        req.keys.clear();
        let u = rng.next_f64();
        let verb = if u < self.get_cut {
            Verb::Get
        } else if u < self.set_cut {
            Verb::Set
        } else {
            Verb::Delete
        };
        req.verb = Some(verb);
        let n = if verb == Verb::Get { self.width } else { 1 };
        for _ in 0..n {
            req.keys.push(self.popularity.sample(rng));
        }
        req.value_len = if verb == Verb::Set {
            self.keyspace.value_len(rng)
        } else {
            0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_padded_and_unique() {
        let ks = KeySpace::new(&KeySpaceSpec::default());
        assert_eq!(ks.key(0), b"k000000000000000");
        assert_eq!(ks.key(12345), b"k000000000012345");
        assert_eq!(ks.key(99_999).len(), 16);
        let ranged = KeySpace::new(&KeySpaceSpec {
            keys: 1000,
            key_size: SizeRange { min: 8, max: 40 },
            value_size: SizeRange::fixed(1),
        });
        let mut lens = std::collections::BTreeSet::new();
        for id in 0..1000 {
            let k = ranged.key(id);
            assert!((8..=40).contains(&k.len()));
            assert_eq!(k.len(), ranged.key_len(id));
            assert!(k.ends_with(id.to_string().as_bytes()));
            lens.insert(k.len());
        }
        assert!(lens.len() > 20, "lengths should spread over the range");
    }

    #[test]
    fn validation_refuses_absurd_key_counts() {
        let mut w = Workload::default();
        w.keyspace.keys = MAX_KEYS;
        w.validate().unwrap();
        // What a file's 1e20 (or a saturated cast) becomes.
        w.keyspace.keys = u64::MAX;
        assert!(matches!(
            w.validate(),
            Err(LoadgenError::Workload {
                field: "keyspace.keys",
                ..
            })
        ));
    }

    #[test]
    fn validation_catches_short_keys() {
        let mut w = Workload::default();
        w.keyspace.keys = 100_000_000;
        w.keyspace.key_size = SizeRange::fixed(8);
        assert!(matches!(
            w.validate(),
            Err(LoadgenError::Workload {
                field: "keyspace.key_size",
                ..
            })
        ));
        w.keyspace.key_size = SizeRange::fixed(9);
        w.validate().unwrap();
    }

    #[test]
    fn mix_proportions() {
        let w = Workload {
            mix: Mix {
                get: 8.0,
                set: 1.5,
                delete: 0.5,
                multiget_width: 4,
            },
            ..Workload::default()
        };
        let mut g = RequestGen::new(&w);
        let mut rng = Rng::new(5, 0);
        let mut req = Request::default();
        let mut counts = [0usize; 3];
        let n = 100_000;
        for _ in 0..n {
            g.next(&mut rng, &mut req);
            match req.verb.unwrap() {
                Verb::Get => {
                    assert_eq!(req.keys.len(), 4);
                    counts[0] += 1
                }
                Verb::Set => {
                    assert_eq!(req.value_len, 32);
                    counts[1] += 1
                }
                Verb::Delete => counts[2] += 1,
            }
        }
        let frac = |c: usize| c as f64 / n as f64;
        assert!((frac(counts[0]) - 0.80).abs() < 0.01);
        assert!((frac(counts[1]) - 0.15).abs() < 0.01);
        assert!((frac(counts[2]) - 0.05).abs() < 0.01);
    }

    #[test]
    fn shipped_bmc_workload_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/bmc.toml");
        let w = Workload::from_file(&path).unwrap();
        assert_eq!(w.keyspace.keys, 100_000);
        assert_eq!(w.keyspace.key_size, SizeRange::fixed(16));
        assert_eq!(w.keyspace.value_size, SizeRange::fixed(32));
        assert_eq!(w.popularity.distribution, Distribution::Zipf);
        assert!((w.popularity.theta - 0.99).abs() < 1e-12);
        assert_eq!((w.mix.get, w.mix.set, w.mix.delete), (1.0, 0.0, 0.0));
        assert!(w.phases.populate);
    }

    #[test]
    fn every_shipped_workload_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Workload::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = toml::from_str::<Workload>("[mix]\ngets = 1.0\n");
        assert!(e.is_err());
    }
}
