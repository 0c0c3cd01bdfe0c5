//! `sensor`: emits readings on `outputs[0]` at `rate_hz` from a seeded generator:
//! `base + amplitude * sin(2π t / period_s) + drift_per_s * t + noise`, plus injected
//! anomalies, each reading labelled with its ground truth: spikes (one reading off by
//! `anomaly_size` noise deviations, with probability `anomaly_rate`) and level shifts
//! (`shift_len` readings off by `shift_size` deviations, starting with probability
//! `shift_rate` at each reading). Spikes are easy for any detector; shifts are small and
//! show only against the readings before them, which is what the bigger models are for. Reading `n` depends only on `(seed, n)`, so a
//! restarted sensor continues the same series from its snapshot (the count emitted).
//!
//! Or it replays a CSV file (`csv = "path/to/file.csv"`, relative to the node's working
//! directory) at `rate_hz`, from the start again when it reaches the end unless
//! `repeat = false`. Columns: a header line naming them, then one reading per line; `value`
//! (a number) is required; `label` is optional (`anomaly`, `1` or `true` for an anomaly;
//! `normal`, `0`, `false` or empty otherwise); other columns are ignored; blank lines and
//! lines starting with `#` are skipped. The file is read and checked when the config is
//! checked: an error names the line. At most `csv_bytes_max` bytes (default 64 MiB).
//!
//! Payload (`strata.reading/1`): `{"value": 21.5, "ts_ms": 1764160000000, "n": 42, "label": "normal"}`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use serde::Deserialize;
use strata_core::config::ActorSpec;
use strata_core::log::Draft;
use strata_core::{ActorError, Behaviour, Ctx, Kind, PayloadType, StreamName};

pub const READING_TYPE: &str = "strata.reading/1";
/// Readings emitted per tick at most, so a late tick never emits an unbounded burst.
const BURST_LEN_MAX: u64 = 1_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorParams {
    /// Readings per second. Required, in 0.001..=100000.
    pub rate_hz: f64,
    /// Generator seed. Default 0.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_base")]
    pub base: f64,
    #[serde(default = "d_amplitude")]
    pub amplitude: f64,
    #[serde(default = "d_period")]
    pub period_s: f64,
    #[serde(default)]
    pub drift_per_s: f64,
    /// Standard deviation of the Gaussian noise. Default 0.5.
    #[serde(default = "d_noise")]
    pub noise: f64,
    /// Probability that a reading is an anomaly. Default 0.01.
    #[serde(default = "d_anomaly_rate")]
    pub anomaly_rate: f64,
    /// Size of an anomaly, in noise deviations. Default 8.
    #[serde(default = "d_anomaly_size")]
    pub anomaly_size: f64,
    /// Probability that a level shift starts at a reading. Default 0.002.
    #[serde(default = "d_shift_rate")]
    pub shift_rate: f64,
    /// Length of a level shift, in readings. Default 10.
    #[serde(default = "d_shift_len")]
    pub shift_len: u64,
    /// Size of a level shift, in noise deviations. Default 2.5.
    #[serde(default = "d_shift_size")]
    pub shift_size: f64,
    /// Replay this CSV file instead of generating. Default none.
    #[serde(default)]
    pub csv: Option<std::path::PathBuf>,
    /// Replay the CSV file again from the start at its end. Default true.
    #[serde(default = "d_repeat")]
    pub repeat: bool,
    /// Largest CSV file accepted, in bytes. Default 67108864 (64 MiB).
    #[serde(default = "d_csv_bytes_max")]
    pub csv_bytes_max: u64,
}

fn d_repeat() -> bool {
    true
}
fn d_csv_bytes_max() -> u64 {
    64 * 1024 * 1024
}

/// One CSV row: the value and whether it is labelled an anomaly.
pub type Row = (f64, bool);

/// Parses a sensor CSV (see the module doc); errors name the line.
pub fn parse_csv(text: &str) -> Result<Vec<Row>, String> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let Some((_, header)) = lines.next() else { return Err("the file has no header line".into()) };
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let value_at = columns.iter().position(|c| *c == "value").ok_or_else(|| format!("the header {header:?} has no `value` column"))?;
    let label_at = columns.iter().position(|c| *c == "label");
    let mut rows = Vec::new();
    for (i, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let at = |k: usize| fields.get(k).copied().unwrap_or("");
        let value: f64 = at(value_at).parse().map_err(|_| format!("line {}: value {:?} is not a number", i + 1, at(value_at)))?;
        if !value.is_finite() {
            return Err(format!("line {}: value {value} is not finite", i + 1));
        }
        let anomaly = match label_at.map(at).unwrap_or("") {
            "anomaly" | "1" | "true" => true,
            "normal" | "0" | "false" | "" => false,
            other => return Err(format!("line {}: label {other:?} is not anomaly/normal/1/0/true/false", i + 1)),
        };
        rows.push((value, anomaly));
    }
    if rows.is_empty() {
        return Err("the file has no readings".into());
    }
    Ok(rows)
}

fn d_base() -> f64 {
    20.0
}
fn d_amplitude() -> f64 {
    2.0
}
fn d_period() -> f64 {
    60.0
}
fn d_noise() -> f64 {
    0.5
}
fn d_anomaly_rate() -> f64 {
    0.01
}
fn d_anomaly_size() -> f64 {
    8.0
}
fn d_shift_rate() -> f64 {
    0.002
}
fn d_shift_len() -> u64 {
    10
}
fn d_shift_size() -> f64 {
    2.5
}
/// Longest level shift accepted (each reading looks back this far for one).
const SHIFT_LEN_MAX: u64 = 1_000;

/// One generated reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub n: u64,
    pub value: f64,
    pub anomaly: bool,
}

impl SensorParams {
    /// Reading number `n` (0-based): a pure function of the params and `n`.
    pub fn sample(&self, n: u64) -> Sample {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let t = n as f64 / self.rate_hz;
        // Box-Muller: one standard normal deviate from two uniforms.
        let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
        let gauss = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let anomaly = rng.gen_bool(self.anomaly_rate);
        let spike = if anomaly { self.anomaly_size * self.noise.max(f64::MIN_POSITIVE) * if rng.gen() { 1.0 } else { -1.0 } } else { 0.0 };
        let shift = self.shift_at(n);
        let value =
            self.base + self.amplitude * (2.0 * std::f64::consts::PI * t / self.period_s).sin() + self.drift_per_s * t + self.noise * gauss + spike + shift;
        Sample { n, value, anomaly: anomaly || shift != 0.0 }
    }

    /// The level shift reading `n` is in (0.0 if none): the latest one started at most
    /// `shift_len - 1` readings before it. Each reading's start draw is its own seeded stream.
    fn shift_at(&self, n: u64) -> f64 {
        if self.shift_rate <= 0.0 {
            return 0.0;
        }
        for back in 0..self.shift_len.min(n + 1) {
            let m = n - back;
            let mut rng = rand::rngs::StdRng::seed_from_u64(!self.seed ^ m.wrapping_mul(0xD1B5_4A32_D192_ED03));
            if rng.gen_bool(self.shift_rate) {
                let sign = if rng.gen() { 1.0 } else { -1.0 };
                return sign * self.shift_size * self.noise.max(f64::MIN_POSITIVE);
            }
        }
        0.0
    }
}

pub struct Sensor {
    params: SensorParams,
    /// The CSV rows, when replaying a file.
    rows: Option<Vec<Row>>,
    out: StreamName,
}

impl Sensor {
    /// Reading `n`, or `None` past the end of a CSV replayed once.
    fn reading(&self, n: u64) -> Option<Sample> {
        match &self.rows {
            None => Some(self.params.sample(n)),
            Some(rows) => {
                let len = rows.len() as u64;
                if !self.params.repeat && n >= len {
                    return None;
                }
                let (value, anomaly) = rows[(n % len) as usize];
                Some(Sample { n, value, anomaly })
            }
        }
    }
}

/// Readings emitted so far and the clock they are paced against.
pub struct SensorState {
    emitted: u64,
    since: Instant,
    emitted_at_since: u64,
}

impl Sensor {
    pub fn from_spec(spec: &ActorSpec) -> Result<Sensor, String> {
        let params: SensorParams = crate::params(spec)?;
        if !(0.001..=100_000.0).contains(&params.rate_hz) {
            return Err(format!("rate_hz: {} is not in 0.001..=100000", params.rate_hz));
        }
        if !(0.0..=1.0).contains(&params.anomaly_rate) {
            return Err(format!("anomaly_rate: {} is not in 0.0..=1.0", params.anomaly_rate));
        }
        if !(0.0..=1.0).contains(&params.shift_rate) {
            return Err(format!("shift_rate: {} is not in 0.0..=1.0", params.shift_rate));
        }
        if params.shift_len > SHIFT_LEN_MAX {
            return Err(format!("shift_len: {} readings is more than {SHIFT_LEN_MAX}", params.shift_len));
        }
        // TOML can write `nan` and `inf`: a generator fed one emits readings no model can use
        // (JSON stores them as null), so each number is checked by name.
        let numbers = [
            ("base", params.base),
            ("amplitude", params.amplitude),
            ("period_s", params.period_s),
            ("drift_per_s", params.drift_per_s),
            ("noise", params.noise),
            ("anomaly_size", params.anomaly_size),
            ("shift_size", params.shift_size),
        ];
        if let Some((name, v)) = numbers.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name}: {v} is not a finite number"));
        }
        if params.period_s <= 0.0 || params.noise < 0.0 {
            return Err("period_s must be > 0 and noise >= 0".into());
        }
        if !spec.inputs.is_empty() {
            return Err("inputs: a sensor has no inputs".into());
        }
        let rows = match &params.csv {
            None => None,
            Some(path) => {
                let what = |e: String| format!("csv: {}: {e}", path.display());
                let len = std::fs::metadata(path).map_err(|e| what(e.to_string()))?.len();
                if len > params.csv_bytes_max {
                    return Err(what(format!("{len} bytes is more than csv_bytes_max ({})", params.csv_bytes_max)));
                }
                let text = std::fs::read_to_string(path).map_err(|e| what(e.to_string()))?;
                Some(parse_csv(&text).map_err(what)?)
            }
        };
        Ok(Sensor { out: crate::output(spec, 0, "the readings")?, params, rows })
    }
}

impl Behaviour for Sensor {
    type State = SensorState;

    async fn start(&self, ctx: &mut Ctx) -> Result<SensorState, ActorError> {
        let emitted = match ctx.snapshot() {
            Some(b) => u64::from_le_bytes(b.try_into().map_err(|_| "sensor snapshot is not 8 bytes")?),
            None => 0,
        };
        Ok(SensorState { emitted, since: Instant::now(), emitted_at_since: emitted })
    }

    async fn handle(&self, _: &mut Ctx, _: &mut SensorState, _: &strata_core::Envelope) -> Result<(), ActorError> {
        Ok(())
    }

    async fn tick(&self, ctx: &mut Ctx, s: &mut SensorState) -> Result<(), ActorError> {
        let due = s.emitted_at_since + (s.since.elapsed().as_secs_f64() * self.params.rate_hz) as u64;
        let until = due.min(s.emitted + BURST_LEN_MAX);
        if until <= s.emitted {
            return Ok(());
        }
        let ts_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut until = until;
        for n in s.emitted..until {
            let Some(r) = self.reading(n) else {
                until = n;
                break;
            };
            let label = if r.anomaly { "anomaly" } else { "normal" };
            let doc = serde_json::json!({ "value": r.value, "ts_ms": ts_ms, "n": n, "label": label });
            ctx.emit(&self.out, Draft::new(Kind::Reading, PayloadType::new(READING_TYPE)?, doc.to_string().into_bytes()))?;
        }
        if until == s.emitted {
            // A CSV file played once has ended: nothing to write (the snapshot would be written
            // again at every tick, and wake every idle actor with it).
            return Ok(());
        }
        s.emitted = until;
        if due > until {
            // Far behind (a long pause): skip ahead rather than burst forever.
            s.since = Instant::now();
            s.emitted_at_since = until;
        }
        ctx.save_snapshot(s.emitted.to_le_bytes().to_vec());
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs_f64((1.0 / self.params.rate_hz).clamp(0.01, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: u64) -> SensorParams {
        toml::from_str(&format!("rate_hz = 100\nseed = {seed}\nanomaly_rate = 0.05\nshift_rate = 0")).unwrap()
    }

    #[test]
    fn samples_depend_only_on_seed_and_index() {
        let (a, b) = (params(7), params(7));
        for n in [0, 1, 99, 12_345] {
            assert_eq!(a.sample(n), b.sample(n));
        }
        assert_ne!(params(8).sample(3).value, a.sample(3).value);
    }

    #[test]
    fn csv_files_are_checked_line_by_line_and_replayed() {
        let rows = parse_csv("# a comment\nts,value,label\n1,20.5,normal\n\n2,99,anomaly\n3,21,\n").unwrap();
        assert_eq!(rows, [(20.5, false), (99.0, true), (21.0, false)]);
        assert_eq!(parse_csv("value\n1\nhot\n").unwrap_err(), "line 3: value \"hot\" is not a number");
        assert_eq!(parse_csv("v,label\n1,x\n").unwrap_err(), "the header \"v,label\" has no `value` column");
        assert_eq!(parse_csv("value,label\n1,maybe\n").unwrap_err(), "line 2: label \"maybe\" is not anomaly/normal/1/0/true/false");
        assert_eq!(parse_csv("value\n").unwrap_err(), "the file has no readings");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("line.csv");
        std::fs::write(&path, "value,label\n1.5,normal\n9,anomaly\n").unwrap();
        let spec = |extra: &str| -> ActorSpec {
            toml::from_str(&format!(
                "kind = \"sensor\"\nname = \"s\"\noutputs = [\"r\"]\nparams = {{ rate_hz = 10, csv = {:?}{extra} }}",
                path.display().to_string()
            ))
            .unwrap()
        };
        let looped = Sensor::from_spec(&spec("")).unwrap();
        let values: Vec<(f64, bool)> = (0..5).map(|n| looped.reading(n).map(|s| (s.value, s.anomaly)).unwrap()).collect();
        assert_eq!(values, [(1.5, false), (9.0, true), (1.5, false), (9.0, true), (1.5, false)]);
        let once = Sensor::from_spec(&spec(", repeat = false")).unwrap();
        assert!(once.reading(1).is_some() && once.reading(2).is_none());
        for (field, value) in [("period_s", "nan"), ("noise", "inf"), ("base", "-inf"), ("shift_size", "nan")] {
            let err = Sensor::from_spec(&spec(&format!(", {field} = {value}"))).err().unwrap();
            assert_eq!(err, format!("{field}: {} is not a finite number", value.parse::<f64>().unwrap()));
        }
        let err = Sensor::from_spec(&spec(", csv_bytes_max = 4")).err().unwrap();
        assert!(err.contains("is more than csv_bytes_max (4)"), "{err}");
        std::fs::write(&path, "value\nNaNx\n").unwrap();
        let err = Sensor::from_spec(&spec("")).err().unwrap();
        assert!(err.starts_with("csv: ") && err.ends_with("line 2: value \"NaNx\" is not a number"), "{err}");
    }

    #[test]
    fn anomalies_are_rare_labelled_and_far_from_the_signal() {
        let p = params(1);
        let samples: Vec<Sample> = (0..10_000).map(|n| p.sample(n)).collect();
        let anomalies: Vec<&Sample> = samples.iter().filter(|s| s.anomaly).collect();
        assert!((300..=700).contains(&anomalies.len()), "{} anomalies in 10000 at rate 0.05", anomalies.len());
        let base = |s: &Sample| p.base + p.amplitude * (2.0 * std::f64::consts::PI * (s.n as f64 / p.rate_hz) / p.period_s).sin();
        let far = anomalies.iter().filter(|s| (s.value - base(s)).abs() > 4.0 * p.noise).count();
        assert!(far * 10 >= anomalies.len() * 9, "{far} of {} anomalies beyond 4 sigma", anomalies.len());
        let normal_far = samples.iter().filter(|s| !s.anomaly && (s.value - base(s)).abs() > 4.0 * p.noise).count();
        assert!(normal_far < 10, "{normal_far} normal readings beyond 4 sigma");
    }

    #[test]
    fn level_shifts_are_runs_of_labelled_readings_off_by_their_size() {
        let p: SensorParams = toml::from_str("rate_hz = 100\nseed = 4\nanomaly_rate = 0\nshift_rate = 0.01").unwrap();
        let samples: Vec<Sample> = (0..20_000).map(|n| p.sample(n)).collect();
        let labelled = samples.iter().filter(|s| s.anomaly).count();
        // About 1 start per 100 readings, each 10 long (overlaps merge).
        assert!((1_200..=2_200).contains(&labelled), "{labelled} readings in shifts");
        let base = |s: &Sample| p.base + p.amplitude * (2.0 * std::f64::consts::PI * (s.n as f64 / p.rate_hz) / p.period_s).sin();
        let shifted: f64 = samples.iter().filter(|s| s.anomaly).map(|s| (s.value - base(s)).abs()).sum::<f64>() / labelled as f64;
        assert!((shifted - 2.5 * p.noise).abs() < 0.15, "mean |offset| {shifted:.3} of shifted readings, want ~{}", 2.5 * p.noise);
        // Runs: every labelled reading is within shift_len of a run's start.
        let run_lengths: Vec<usize> = samples.split(|s| !s.anomaly).map(<[Sample]>::len).filter(|l| *l > 0).collect();
        assert!(run_lengths.iter().all(|l| *l >= 10), "{run_lengths:?}");
    }
}
