//! Free loopback TCP ports for the nodes a demo or a test starts.
//!
//! A port taken with `bind(0)` and released is in the kernel's ephemeral range, where the
//! kernel may give it to an outgoing connection or to another `bind(0)` before the node binds
//! it; a CI run failed with "Address already in use" that way. Ports handed out here come from
//! below that range, where the kernel never picks one by itself, and are checked by binding.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Lowest port handed out: above the well-known ports and the usual service ports.
const LOW: u16 = 10_000;

/// Used when `/proc/sys/net/ipv4/ip_local_port_range` cannot be read (Linux's default start).
const EPHEMERAL_LOW_DEFAULT: u16 = 32_768;

/// A loopback TCP port that is free now, for a process that binds it shortly after.
///
/// Within one process no port is handed out twice before the whole range below the ephemeral
/// range was gone through (tests running in parallel threads never get the same one); the walk
/// starts at a random place, so that separate processes are unlikely to meet.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let high = ephemeral_low().max(LOW + 100);
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        (h.finish() % u64::from(high - LOW)) as u32
    });
    walk(LOW, high, start, &NEXT).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no free loopback port between {LOW} and {high}")))
}

/// The next port of `low..high` that binds, walking from `low + start`; `next` counts the
/// steps taken so far.
fn walk(low: u16, high: u16, start: u32, next: &AtomicU32) -> Option<u16> {
    let range = u32::from(high - low);
    (0..range).find_map(|_| {
        let step = next.fetch_add(1, Ordering::Relaxed);
        let port = low + ((start % range + step % range) % range) as u16;
        TcpListener::bind(("127.0.0.1", port)).is_ok().then_some(port)
    })
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(EPHEMERAL_LOW_DEFAULT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_loopback_port().unwrap()).collect();
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        let high = ephemeral_low().max(LOW + 100);
        assert!(ports.iter().all(|p| (LOW..high).contains(p)), "{ports:?} not all in {LOW}..{high}");
        // Free when handed out: binding the last one works.
        TcpListener::bind(("127.0.0.1", *ports.last().unwrap())).unwrap();
    }

    #[test]
    fn a_port_in_use_is_skipped_even_after_the_walk_wraps_around() {
        // A port of the walk's range held open by someone else is not handed out.
        let held = TcpListener::bind(("127.0.0.1", free_loopback_port().unwrap())).unwrap();
        let port = held.local_addr().unwrap().port();
        let next = AtomicU32::new(0);
        let got = walk(port, port + 3, 0, &next).unwrap();
        assert_ne!(got, port, "the held port was handed out");
        assert_eq!(next.load(Ordering::Relaxed), u32::from(got - port) + 1, "one step per port tried");
        // Started past the held port, the walk comes round to it and skips it again.
        let next = AtomicU32::new(0);
        let got = walk(port - 2, port + 1, 2, &next);
        assert!(got.is_some_and(|p| p != port && (port - 2..port).contains(&p)), "{got:?}");
        // A range whose only port is held yields nothing.
        assert_eq!(walk(port, port + 1, 0, &AtomicU32::new(0)), None);
    }
}
