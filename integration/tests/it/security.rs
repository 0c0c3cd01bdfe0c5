//! Issue #9: security between tiers. The secured example continuum (`configs/secure/`) runs
//! with mutual TLS (Zenoh's QUIC link, TLS 1.3) and the access control `strata acl` derives
//! from its configs; it replicates as in #4, and every way in the issue to get around it
//! fails. Each negative case prints `attempts / rejected / delivered-anyway`; a case that
//! passes an authorised session's traffic also shows a positive control through the same
//! session, so that "nothing arrived" cannot come from a dead session.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_core::log::{RocksStore, Store, StreamKey};
use strata_core::model::Envelope;
use strata_integration::{free_port, reading_envelope as envelope, repo_root, strata_bin, wait_until, NodeProc};

const NODES: [(&str, &str); 3] = [("cloud-1", "cloud"), ("fog-1", "fog"), ("edge-1", "edge")];

/// Runs `strata` with `args` in `cwd`; (exit code, stdout, stderr).
fn strata(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(strata_bin()).args(args).current_dir(cwd).output().expect("run strata");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The secured example configs, rewritten for a test directory: free ports, the test's
/// certificates and stores, absolute model paths, the continuum naming the rewritten files;
/// `edit` changes each text further. `[(id, text)]` in start order (cloud, fog, edge).
fn secure_configs(dir: &Path, certs: &Path, edit: impl Fn(&str, String) -> String) -> Vec<(&'static str, String)> {
    let ports = [("7457", free_port()), ("7458", free_port()), ("7459", free_port())];
    NODES
        .iter()
        .map(|&(id, file)| {
            let mut text = std::fs::read_to_string(repo_root().join(format!("configs/secure/{file}.toml"))).unwrap();
            for (fixed, port) in ports {
                text = text.replace(&format!("127.0.0.1:{fixed}"), &format!("127.0.0.1:{port}"));
            }
            for (i, f) in NODES {
                text = text.replace(&format!("\"configs/secure/{f}.toml\""), &format!("{:?}", dir.join(format!("{i}.toml"))));
            }
            text = text.replace("\"certs/", &format!("\"{}/", certs.display()));
            text = text.replace("onnx_path = \"configs/", &format!("onnx_path = \"{}/configs/", repo_root().display()));
            text = text.replace(&format!("data_dir = \"data/secure/{id}\""), "data_dir = \"{data_dir}\"");
            (id, edit(id, text))
        })
        .collect()
}

/// The endpoint a node listens on, from its config text.
fn listen_of(text: &str) -> String {
    let line = text.lines().find(|l| l.starts_with("listen")).unwrap();
    line.split('"').nth(1).unwrap().to_owned()
}

/// A Zenoh client session over QUIC with the given identity (`None`: no certificate), or
/// the error Zenoh gave when the link was refused.
async fn client(endpoint: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<zenoh::Session, String> {
    let mut c = zenoh::Config::default();
    let mut set = |k: &str, v: String| c.insert_json5(k, &v).unwrap();
    set("mode", "\"client\"".into());
    set("connect/endpoints", format!("[{endpoint:?}]"));
    set("scouting/multicast/enabled", "false".into());
    set("connect/timeout_ms", "3000".into());
    set("connect/exit_on_failure", "true".into());
    set("transport/link/tls/root_ca_certificate", format!("{:?}", ca));
    if let Some((cert, key)) = identity {
        set("transport/link/tls/connect_certificate", format!("{:?}", cert));
        set("transport/link/tls/connect_private_key", format!("{:?}", key));
        set("transport/link/tls/enable_mtls", "true".into());
    }
    zenoh::open(c).await.map_err(|e| e.to_string())
}

fn encoded(e: &Envelope) -> Vec<u8> {
    strata_core::codec::encode(e, &Default::default()).unwrap()
}

/// Every `(origin, stream)` with its records' seqs in a store (read-only view).
fn holdings(data_dir: &Path) -> Vec<(String, String, Vec<u64>)> {
    let store = RocksStore::open_read_only(data_dir).expect("open the store read-only");
    let mut out = Vec::new();
    for info in store.streams() {
        let key = StreamKey { origin: info.origin.clone(), incarnation: info.incarnation, stream: info.stream.clone() };
        let (mut seqs, mut from) = (Vec::new(), 1);
        loop {
            let batch = store.read(&key, from, 4096).unwrap();
            let Some(last) = batch.last() else { break };
            from = last.id.seq.get() + 1;
            seqs.extend(batch.iter().map(|e| e.id.seq.get()));
        }
        out.push((info.origin.to_string(), info.stream.to_string(), seqs));
    }
    out
}

/// Records of `stream` (any origin) held in a store.
fn count_stream(data_dir: &Path, stream: &str) -> usize {
    holdings(data_dir).iter().filter(|(_, s, _)| s == stream).map(|(_, _, seqs)| seqs.len()).sum()
}

fn print_case(name: &str, attempts: usize, rejected: usize, delivered: usize) {
    report!("{name:<58} attempts {attempts:>3} / rejected {rejected:>3} / delivered-anyway {delivered} (must be 0)");
}

/// A client session's status query of `node` (through an operator's session).
async fn status(ops: &zenoh::Session, node: &str) -> serde_json::Value {
    for _ in 0..20 {
        if let Some(doc) = strata_integration::status(ops, node).await {
            return doc;
        }
    }
    panic!("{node} did not answer the operator's status query")
}

fn pending_escalations(doc: &serde_json::Value) -> Vec<String> {
    doc["escalations_pending"].as_array().into_iter().flatten().filter_map(|e| e["id"].as_str().map(String::from)).collect()
}

#[test]
fn secured_continuum_replicates_and_refuses_every_way_around_it() {
    let _serial = crate::replication::serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    let other = d.join("other-ca");
    let certs_s = certs.to_str().unwrap();
    for args in [
        vec!["certs", "init", certs_s],
        vec!["certs", "issue", certs_s, "edge-1", "fog-1", "cloud-1", "ops", "line-3-gw", "intruder"],
        vec!["certs", "init", other.to_str().unwrap()],
        vec!["certs", "issue", other.to_str().unwrap(), "edge-1"],
    ] {
        let (code, _, err) = strata(d, &args);
        assert_eq!(code, 0, "strata {args:?}: {err}");
    }
    // The edge samples fast enough for 10,000 readings in a test, and keeps escalations
    // waiting long enough to try approving them.
    let configs = secure_configs(d, &certs, |id, text| {
        if id == "edge-1" {
            text.replace("rate_hz = 100,", "rate_hz = 1000,") + "\n[autonomy]\nescalation_timeout_ms = 600000\n"
        } else {
            text
        }
    });
    let endpoint = |id: &str| listen_of(&configs.iter().find(|(i, _)| *i == id).unwrap().1);
    let (edge_ep, fog_ep) = (endpoint("edge-1"), endpoint("fog-1"));
    let mut nodes: Vec<NodeProc> = configs.iter().map(|(id, text)| NodeProc::new(d, id, text)).collect();
    for n in &mut nodes {
        n.start();
    }
    let (cloud_dir, fog_dir, edge_dir) = (nodes[0].data_dir.clone(), nodes[1].data_dir.clone(), nodes[2].data_dir.clone());
    let logs = |nodes: &[NodeProc]| nodes.iter().map(|n| format!("--- {}\n{}", n.id, n.log_text())).collect::<Vec<_>>().join("\n");
    let ca = certs.join("ca.pem");
    let id_of = |name: &str| (certs.join(format!("{name}.pem")), certs.join(format!("{name}.key")));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (ops_cert, ops_key) = id_of("ops");
        let ops = client(&fog_ep, &ca, Some((&ops_cert, &ops_key))).await.expect("the operator connects to the fog");

        // --- Acceptance 1: the continuum replicates under mTLS + ACL, as in #4 -------------
        let t0 = Instant::now();
        let mut cloud_wm = 0;
        let reached = wait_until(Duration::from_secs(120), || {
            cloud_wm = rt_watermark(&ops, "cloud-1", "edge-1", "readings/line-3");
            cloud_wm >= 10_000
        });
        assert!(reached, "the cloud holds {cloud_wm} of the edge's readings after 120 s\n{}", logs(&nodes));
        let reach_s = t0.elapsed().as_secs_f64();
        // Every node applies the ACL `strata acl` prints for it.
        let (code, digests, err) = strata(d, &["acl", "--digest", "cloud-1.toml", "fog-1.toml", "edge-1.toml"]);
        assert_eq!(code, 0, "{err}");
        for (id, _) in NODES {
            let doc = status(&ops, id).await;
            let want = digests.lines().find_map(|l| l.strip_prefix(&format!("{id} "))).unwrap();
            assert_eq!(doc["security"]["tls"], true, "{id}");
            assert_eq!(doc["security"]["acl_digest"], want, "{id} applies another ACL than `strata acl` prints");
        }
        report!("ACL applied = `strata acl --digest`: {}", digests.trim().replace('\n', ", "));

        // --- Acceptance 2: negative cases ---------------------------------------------------
        let attempts = 3;
        // A node without a certificate, and a certificate from another CA: the link is refused.
        for (name, identity) in [
            ("no certificate", None),
            ("a certificate from another CA", Some((other.join("edge-1.pem"), other.join("edge-1.key")))),
        ] {
            let mut rejected = 0;
            let mut delivered = 0;
            for i in 0..attempts {
                match client(&fog_ep, &ca, identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()))).await {
                    Err(_) => rejected += 1,
                    Ok(s) => {
                        let e = envelope("edge-1", 0xbad0, "readings/neg-link", i + 1);
                        s.put("strata/s/edge-1/readings/neg-link", encoded(&e)).await.unwrap();
                        s.close().await.unwrap();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            delivered += count_stream(&fog_dir, "readings/neg-link");
            print_case(&format!("link with {name}"), attempts as usize, rejected, delivered);
            assert_eq!((rejected, delivered), (attempts as usize, 0), "{name}");
        }

        // A valid certificate whose common name is not a configured node: the link opens,
        // the ACL (default deny) lets nothing through either way.
        {
            let (c, k) = id_of("intruder");
            let s = client(&fog_ep, &ca, Some((&c, &k))).await.expect("a valid certificate opens the link");
            // Remote only: the session's own puts are not deliveries through the fog.
            let sub = s.declare_subscriber("strata/**").allowed_origin(zenoh::sample::Locality::Remote).await.unwrap();
            for i in 1..=attempts {
                s.put("strata/s/edge-1/readings/neg-intruder", encoded(&envelope("edge-1", 0xbad1, "readings/neg-intruder", i))).await.unwrap();
            }
            let replies = s.get("strata/status/*").timeout(Duration::from_secs(2)).await.unwrap();
            let mut answered = 0;
            while replies.recv_async().await.is_ok() {
                answered += 1;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let received = sub.drain().len();
            let stored = count_stream(&fog_dir, "readings/neg-intruder") + count_stream(&cloud_dir, "readings/neg-intruder");
            let tries = attempts as usize + 2; // puts, one subscription, one query
            let delivered = stored + received + answered;
            print_case("valid certificate, common name not a configured node", tries, tries - delivered.min(tries), delivered);
            assert_eq!((stored, received, answered), (0, 0, 0));
            s.close().await.unwrap();
        }

        // A valid node publishing under another node's key (with a positive control: the
        // same session's puts under its own key arrive).
        {
            let (c, k) = id_of("edge-1");
            let s = client(&fog_ep, &ca, Some((&c, &k))).await.unwrap();
            for i in 1..=attempts {
                s.put("strata/s/fog-1/readings/neg-other", encoded(&envelope("fog-1", 0xbad2, "readings/neg-other", i))).await.unwrap();
                s.put("strata/s/edge-1/readings/neg-control", encoded(&envelope("edge-1", 0xbad2, "readings/neg-control", i))).await.unwrap();
            }
            let control_ok = wait_until(Duration::from_secs(20), || count_stream(&cloud_dir, "readings/neg-control") == attempts as usize);
            let delivered = count_stream(&fog_dir, "readings/neg-other") + count_stream(&cloud_dir, "readings/neg-other");
            print_case("valid node (edge-1) putting under fog-1's key", attempts as usize, attempts as usize - delivered, delivered);
            report!("  positive control: its {attempts} puts under its own key reached the cloud: {control_ok}");
            assert!(control_ok, "the control puts never reached the cloud\n{}", logs(&nodes));
            assert_eq!(delivered, 0);

            // The same node subscribing to, and asking replays of, streams its config does not
            // name (edge-1 replicates nothing): its own readings, the fog's decisions.
            let sub = s.declare_subscriber("strata/s/**").allowed_origin(zenoh::sample::Locality::Remote).await.unwrap();
            let before = rt_watermark(&ops, "cloud-1", "edge-1", "readings/line-3");
            let mut answered = 0;
            for key in ["strata/replay/edge-1/readings/line-3", "strata/replay/fog-1/events"] {
                let replies = s.get(format!("{key}?from=1&to=10")).timeout(Duration::from_secs(2)).await.unwrap();
                while replies.recv_async().await.is_ok() {
                    answered += 1;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = rt_watermark(&ops, "cloud-1", "edge-1", "readings/line-3");
            let received = sub.drain().len();
            let delivered = received + answered;
            print_case("valid node (edge-1) subscribing/replaying what it may not", 3, 3 - delivered.min(3), delivered);
            report!("  meanwhile the cloud received {} of the edge's readings it subscribes to", after - before);
            assert!(after > before, "no data flowed during the window: the check would prove nothing");
            assert_eq!((received, answered), (0, 0));

            // An envelope whose origin field does not match its key: the fog's receiver
            // rejects it (defence in depth behind the ACL).
            let spoofed_before = status(&ops, "fog-1").await["replication"]["spoofed"].as_u64().unwrap();
            for i in 1..=attempts {
                s.put("strata/s/edge-1/readings/neg-forged", encoded(&envelope("cloud-1", 0xbad3, "readings/neg-forged", i))).await.unwrap();
            }
            let mut spoofed = 0;
            wait_until(Duration::from_secs(10), || {
                spoofed = rt_spoofed(&ops) - spoofed_before;
                spoofed >= attempts
            });
            let delivered = count_stream(&fog_dir, "readings/neg-forged") + count_stream(&cloud_dir, "readings/neg-forged");
            print_case("envelope naming cloud-1 under edge-1's key", attempts as usize, spoofed as usize, delivered);
            assert_eq!((spoofed, delivered), (attempts, 0));
            s.close().await.unwrap();
        }

        // An approval from identities that are not operators (a valid node, a device), then
        // from the operator.
        {
            let mut pending = Vec::new();
            wait_until(Duration::from_secs(60), || {
                pending = pending_escalations(&rt_status(&ops, "edge-1"));
                !pending.is_empty()
            });
            let id = pending.first().cloned().unwrap_or_else(|| panic!("the edge escalated nothing in 60 s\n{}", logs(&nodes)));
            let mut delivered = 0;
            let mut rejected = 0;
            for who in ["edge-1", "line-3-gw"] {
                let (c, k) = id_of(who);
                let args = ["approve", &id, "--connect", &fog_ep, "--by", who, "--timeout-ms", "2000", "--ca", ca.to_str().unwrap(), "--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()];
                let (code, out, err) = strata(d, &args);
                if code == 0 {
                    delivered += 1;
                } else {
                    assert!(err.contains("no node reachable"), "{who}: {out}{err}");
                    rejected += 1;
                }
            }
            let still = pending_escalations(&status(&ops, "edge-1").await).contains(&id);
            print_case("approval by a node and by a device (not operators)", 2, rejected, delivered + usize::from(!still));
            assert!(still, "escalation {id} was resolved by a non-operator");
            assert_eq!(delivered, 0);
            let (c, k) = id_of("ops");
            let args = ["approve", &id, "--connect", &fog_ep, "--by", "ops", "--ca", ca.to_str().unwrap(), "--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()];
            let (code, out, err) = strata(d, &args);
            report!("  positive control: the operator's approval: {}", out.trim());
            assert_eq!(code, 0, "the operator's approval failed: {out}{err}");
        }

        // Device ingest: the configured device may put readings; the operator may not.
        {
            let mut accepted = Vec::new();
            for who in ["line-3-gw", "ops"] {
                let (c, k) = id_of(who);
                let s = client(&edge_ep, &ca, Some((&c, &k))).await.unwrap();
                let key = format!("strata/ingest/readings/ingest-{who}");
                s.put(&key, "{\"value\": 1.5}").await.unwrap();
                // Zenoh closes a QUIC link at once, losing what it has not delivered: a query
                // on the same key returns only once the node has taken in the put (the link
                // keeps order; the node refuses or does not answer the query, and ends it).
                let replies = s.get(&key).timeout(Duration::from_secs(10)).await.unwrap();
                while replies.recv_async().await.is_ok() {}
                s.close().await.unwrap();
            }
            wait_until(Duration::from_secs(10), || {
                accepted = holdings(&edge_dir).into_iter().filter(|(_, s, _)| s.starts_with("readings/ingest-")).map(|(_, s, _)| s).collect();
                !accepted.is_empty()
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            accepted = holdings(&edge_dir).into_iter().filter(|(_, s, _)| s.starts_with("readings/ingest-")).map(|(_, s, _)| s).collect();
            print_case("ingest by a non-device identity (ops)", 1, 1 - accepted.iter().filter(|s| s.ends_with("ops")).count(), accepted.iter().filter(|s| s.ends_with("ops")).count());
            report!("  positive control: the device's reading was appended: {accepted:?}");
            assert_eq!(accepted, ["readings/ingest-line-3-gw"]);

            // The official Python binding as the device, with its certificate.
            let (c, k) = id_of("line-3-gw");
            let script = repo_root().join("integration/scripts/ingest_readings.py");
            let out = Command::new("python3")
                .arg(&script)
                .args([edge_ep.as_str(), "readings/py-tls", "20", "--tls"])
                .args([&ca, &c, &k])
                .output()
                .expect("python3 runs");
            assert!(out.status.success(), "the Python client failed (`make deps` installs eclipse-zenoh):\n{}", String::from_utf8_lossy(&out.stderr));
            let mut python = 0;
            wait_until(Duration::from_secs(20), || {
                python = count_stream(&edge_dir, "readings/py-tls");
                python >= 20
            });
            let rejected = rt_status(&ops, "edge-1")["replication"]["ingest_rejected"].clone();
            report!("  the Python client (eclipse-zenoh, QUIC, its own certificate): 20 readings sent, {python} appended; malformed rejected by reason: {rejected}");
            assert_eq!(python, 20);
        }
        ops.close().await.unwrap();

        // The edge stops; the cloud ends with every reading it produced, once, in order.
        let mut edge = nodes.pop().unwrap();
        assert_eq!(edge.terminate(Duration::from_secs(30)), Some(0), "{}", edge.log_text());
        let produced = holdings(&edge_dir).into_iter().find(|(o, s, _)| o == "edge-1" && s == "readings/line-3").unwrap().2;
        let last = *produced.last().unwrap();
        // Live samples dropped under load leave gaps that replay closes once they outlive a
        // check (`replay_check_interval_ms`), so the last reading can arrive before them.
        let cloud_line = || holdings(&cloud_dir).into_iter().find(|(o, s, _)| o == "edge-1" && s == "readings/line-3").map(|h| h.2).unwrap_or_default();
        let waited = std::time::Instant::now();
        let complete = wait_until(Duration::from_secs(60), || {
            let held = cloud_line();
            held.len() as u64 == last && held.last() == Some(&last)
        });
        let held = cloud_line();
        let in_order = held.iter().enumerate().all(|(i, &s)| s == i as u64 + 1);
        let present: std::collections::HashSet<u64> = held.iter().copied().collect();
        let missing: Vec<u64> = (1..=last).filter(|s| !present.contains(s)).take(20).collect();
        report!(
            "mTLS continuum: edge produced {} readings (10,000 reached the cloud after {reach_s:.1} s); cloud holds {} ({}), in order and without gaps: {in_order}; first missing: {missing:?}; waited {:.1} s after the edge stopped",
            produced.len(),
            held.len(),
            if complete { "all" } else { "NOT all" },
            waited.elapsed().as_secs_f64()
        );
        assert!(complete && in_order && held.len() as u64 == last && produced.len() as u64 == last, "{}", logs(&nodes));
        nodes.push(edge);
    });
}

/// Blocking helpers for `wait_until` closures inside the runtime.
fn rt_status(ops: &zenoh::Session, node: &str) -> serde_json::Value {
    futures::executor::block_on(strata_integration::status(ops, node)).unwrap_or_default()
}

fn rt_watermark(ops: &zenoh::Session, node: &str, origin: &str, stream: &str) -> u64 {
    futures::executor::block_on(strata_integration::watermark(ops, node, origin, stream)).unwrap_or(0)
}

fn rt_spoofed(ops: &zenoh::Session) -> u64 {
    rt_status(ops, "fog-1")["replication"]["spoofed"].as_u64().unwrap_or(0)
}

/// Issue #9, acceptance 3: `strata acl` of the example configs is stable (a golden file;
/// `STRATA_BLESS=1` rewrites it after a deliberate change, to review in the diff).
#[test]
fn acl_of_the_example_configs_matches_the_golden_file() {
    for (configs, golden) in [("configs/secure/*.toml", "acl-secure.json"), ("configs/*.toml", "acl-examples.json")] {
        let (dir, pattern) = configs.rsplit_once('/').unwrap();
        let suffix = pattern.trim_start_matches('*');
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix) && p.is_file())
            .map(|p| p.strip_prefix(repo_root()).unwrap().to_owned())
            .collect();
        files.sort();
        let mut args = vec!["acl".to_owned()];
        args.extend(files.iter().map(|p| p.to_string_lossy().into_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = strata(&repo_root(), &args);
        assert_eq!(code, 0, "strata {args:?}: {err}");
        let again = strata(&repo_root(), &args).1;
        assert_eq!(out, again, "two runs of `strata acl {configs}` differ");
        let path = repo_root().join("integration/tests/golden").join(golden);
        if std::env::var("STRATA_BLESS").is_ok() {
            std::fs::write(&path, &out).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(out == want, "`strata acl {configs}` differs from {} (STRATA_BLESS=1 to accept a deliberate change):\n{out}", path.display());
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        report!(
            "strata acl {configs}: {} nodes, {} rules, matches {golden}",
            doc.as_object().unwrap().len(),
            doc.as_object().unwrap().values().map(|a| a["rules"].as_array().unwrap().len()).sum::<usize>()
        );
    }
}

/// Issue #9, acceptance 4: the README's security section, run exactly as written (its
/// commands, in order, from a directory holding a copy of `configs/`), ends with a status
/// table of the three secured nodes.
#[test]
fn the_readme_security_commands_secure_the_example_continuum() {
    let _serial = crate::replication::serial();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let marker = "<!-- integration/tests/it/security.rs runs exactly these commands";
    let block = readme.split_once(marker).expect("the README marks its security commands").1;
    let block = block.split_once("```sh\n").unwrap().1.split_once("```").unwrap().0;
    let commands: Vec<&str> = block.lines().map(|l| l.split(" # ").next().unwrap().trim()).filter(|l| !l.is_empty()).collect();
    assert!(commands.len() >= 5, "{commands:?}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["configs/secure", "configs/models"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
        for f in std::fs::read_dir(repo_root().join(sub)).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                std::fs::copy(&f, d.join(sub).join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    let mut background = Vec::new();
    let mut last = (0, String::new(), String::new());
    for (i, line) in commands.iter().enumerate() {
        let (line, in_background) = match line.strip_suffix('&') {
            Some(l) => (l.trim(), true),
            None => (*line, false),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "strata", "README command {line:?}");
        report!("$ {line}");
        if in_background {
            let log = std::fs::File::create(d.join(format!("background-{i}.log"))).unwrap();
            let child = Command::new(strata_bin()).args(&words[1..]).current_dir(d).stdout(Stdio::null()).stderr(log).spawn().unwrap();
            background.push(KillOnDrop(child));
        } else if i + 1 < commands.len() {
            last = strata(d, &words[1..]);
            assert_eq!(last.0, 0, "{line}: {}{}", last.1, last.2);
        } else {
            // The last command (the status table) is retried while the links come up.
            let ok = wait_until(Duration::from_secs(60), || {
                last = strata(d, &words[1..]);
                last.0 == 0 && ["cloud-1", "fog-1", "edge-1"].iter().all(|n| last.1.contains(n))
            });
            let logs: String = (0..commands.len()).map(|i| std::fs::read_to_string(d.join(format!("background-{i}.log"))).unwrap_or_default()).collect();
            assert!(ok, "{line}: {}{}\n{logs}", last.1, last.2);
        }
    }
    print!("{}", last.1);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node whose certificate names another node refuses to start, and says why.
#[test]
fn a_node_whose_certificate_names_another_node_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    let certs_s = certs.to_str().unwrap();
    assert_eq!(strata(d, &["certs", "init", certs_s]).0, 0);
    assert_eq!(strata(d, &["certs", "issue", certs_s, "edge-1", "fog-1"]).0, 0);
    let configs = secure_configs(d, &certs, |id, text| if id == "edge-1" { text.replace("/edge-1.pem\"", "/fog-1.pem\"") } else { text });
    for (id, text) in &configs {
        std::fs::write(d.join(format!("{id}.toml")), text.replace("{data_dir}", d.join(format!("{id}-data")).to_str().unwrap())).unwrap();
    }
    let (code, _, err) = strata(d, &["run", "edge-1.toml"]);
    assert_eq!(code, 2, "a configuration problem: {err}");
    assert!(err.contains("fog-1.pem: its common name is \"fog-1\", not this node's id \"edge-1\""), "{err}");
    report!("strata run with another node's certificate: exit {code}: {}", err.lines().last().unwrap_or(""));
    // `strata check` says the same before anything runs; the fog's files are fine, the
    // cloud has no certificate yet.
    let (code, _, check) = strata(d, &["check", "edge-1.toml", "fog-1.toml", "cloud-1.toml"]);
    assert_eq!(code, 2, "{check}");
    assert!(check.contains("edge-1.toml: security.cert_file") && check.contains("its common name is \"fog-1\""), "{check}");
    assert!(check.contains("cloud-1.toml: security.cert_file") && check.contains("cloud-1.pem"), "{check}");
    assert!(!check.contains("fog-1.toml:"), "{check}");
}
