//! Helpers for Strata's multi-node tests and benchmarks: locating the built `strata`
//! binary, temporary configs, free loopback ports.

use std::path::{Path, PathBuf};

/// The `strata` binary of the current build (same profile and target dir as the running
/// test or benchmark). `make test` builds it before running the tests.
pub fn strata_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // <target>/<profile>/deps/it-<hash>  or  <target>/<profile>/<bench>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("strata");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`cargo build --workspace`, which `make test` does)",
        bin.display()
    );
    bin
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A self-checking payload for producer `p`'s `n`th record: `p`, `n`, filler derived from
/// both, and an FNV-1a checksum of all that. [`check_crash_payload`] recovers `(p, n)`.
pub fn crash_payload(p: u8, n: u64) -> Vec<u8> {
    let mut out = vec![p];
    out.extend_from_slice(&n.to_le_bytes());
    let mut x = (n << 8) ^ p as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..(40 + (n % 50) as usize) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// `(producer, n)` of an intact [`crash_payload`]; `None` if it is torn.
pub fn check_crash_payload(payload: &[u8]) -> Option<(u8, u64)> {
    if payload.len() < 17 {
        return None;
    }
    let (body, sum) = payload.split_at(payload.len() - 8);
    if fnv1a(body).to_le_bytes() != sum {
        return None;
    }
    let p = body[0];
    let n = u64::from_le_bytes(body[1..9].try_into().ok()?);
    (crash_payload(p, n) == payload).then_some((p, n))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A built helper binary of this crate (same target dir and profile as the running test).
pub fn helper_bin(name: &str) -> PathBuf {
    let strata = strata_bin();
    let bin = strata.with_file_name(name);
    assert!(bin.exists(), "{} does not exist: build it first (`cargo build --workspace --all-targets`)", bin.display());
    bin
}
