//! Network namespaces for partition tests that cut a real link: a node runs in its own
//! namespace, joined to the host by veth pairs; setting a veth down partitions it the way a
//! cable pull does (no FIN, no RST: only the lease notices).
//!
//! Needs root and `ip netns` (iproute2). [`NsHost::create`] says why it cannot run otherwise.

use std::process::Command;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A namespace with veth links to the host, removed on drop.
pub struct NsHost {
    pub name: String,
    links: Vec<String>,
}

/// One veth pair: `host_if` (address `host_ip`) in the host, its peer (`ns_ip`) in the
/// namespace.
pub struct Link {
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl NsHost {
    /// Creates namespace `name` (at most 8 characters) with loopback up.
    pub fn create(name: &str) -> Result<NsHost, String> {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root: network namespaces need CAP_NET_ADMIN".into());
        }
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = NsHost { name: name.to_owned(), links: Vec::new() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adds veth pair number `n` with the /30 subnet `10.<a>.<b>.0`.
    pub fn add_link(&mut self, n: u8, a: u8, b: u8) -> Result<Link, String> {
        let host_if = format!("{}h{n}", self.name);
        let peer_if = format!("{}n{n}", self.name);
        let (host_ip, ns_ip) = (format!("10.{a}.{b}.1"), format!("10.{a}.{b}.2"));
        let _ = ip(&["link", "del", &host_if]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if])?;
        self.links.push(host_if.clone());
        ip(&["link", "set", &peer_if, "netns", &self.name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["-n", &self.name, "addr", "add", &format!("{ns_ip}/30"), "dev", &peer_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["-n", &self.name, "link", "set", &peer_if, "up"])?;
        Ok(Link { host_if, host_ip, ns_ip })
    }

    pub fn set_link(&self, link: &Link, up: bool) -> Result<(), String> {
        ip(&["link", "set", &link.host_if, if up { "up" } else { "down" }])
    }
}

impl Drop for NsHost {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = ip(&["link", "del", l]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}
