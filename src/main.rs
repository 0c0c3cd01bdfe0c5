//! `strata`: the command line of a Strata node. Thin: it parses arguments and calls into
//! `strata-core`. Exit codes: 0 ok, 2 usage or config error, 1 runtime failure, 130 a
//! signal cut `strata run`'s orderly stop (or `strata demo`) short.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod demo;

use clap::{Parser, Subcommand};
use strata_core::config::{check_continuum, summary_table, NodeConfig, StreamRef};
use strata_core::log::{show, LogError, RocksStore, Store, StreamKey};

#[derive(Parser)]
#[command(name = "strata", version, about = "Strata: durable, deadline-aware middleware for edge/fog/cloud AI systems")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate node configs (with `[security] tls = true`, also the certificate files and
    /// the continuum's configs); given several, also check that they form a continuum
    /// (unique node ids, every connect endpoint is some node's listen, a path
    /// edge -> fog -> cloud) and print a summary.
    Check {
        /// Node config files (TOML).
        #[arg(required = true)]
        configs: Vec<PathBuf>,
    },
    /// Run a node from its config until SIGINT or SIGTERM (then shut down in order, exit 0;
    /// a second signal during that stop exits at once, 130).
    Run {
        /// The node's config file (TOML).
        config: PathBuf,
        /// Log lines as `human` text or `json`.
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Show every node reachable through a Zenoh endpoint: tier, uptime, actors with their
    /// state and restarts, streams, replication lag per peer.
    Status {
        /// A Zenoh endpoint of the continuum, e.g. `tcp/127.0.0.1:7448` (a fog router).
        #[arg(long, value_parser = endpoint)]
        connect: String,
        /// How long to collect answers, in ms.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// The status documents as one JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tls: ClientTls,
    },
    /// Run a three-tier continuum on this machine, break it on purpose (cloud slowed, fog
    /// killed and restarted, fog-cloud link cut and healed), and report what happened.
    Demo(demo::DemoArgs),
    /// Approve a pending escalation: the escalated action is taken (and recorded).
    Approve(Resolve),
    /// Deny a pending escalation: the safe default action is taken (and recorded).
    Deny(Resolve),
    /// Inspect a node's durable log (works while the node runs: opens it read-only).
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// A development PKI for mutual TLS between tiers: a CA, then one certificate per node,
    /// operator or device (its common name is the identity the access control checks).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Print the Zenoh access control of every node, derived from the continuum's configs:
    /// exactly what `strata run` applies on a node with `[security] tls = true`.
    Acl {
        /// Every node config of the continuum (TOML).
        #[arg(required = true)]
        configs: Vec<PathBuf>,
        /// Only this node's access control.
        #[arg(long)]
        node: Option<String>,
        /// One line per node: its id and the digest `strata status` shows for the ACL applied.
        #[arg(long)]
        digest: bool,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA in DIR (`ca.pem`, and `ca.key` readable by you only). Never overwrites.
    Init {
        dir: PathBuf,
        /// Validity, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue `<name>.pem` and `<name>.key` in DIR for each NAME, signed by DIR's CA: node ids,
    /// operators, devices.
    Issue {
        dir: PathBuf,
        #[arg(required = true)]
        names: Vec<String>,
        /// Extra host name or IP address the holders are reached at (repeatable); `localhost`
        /// and `127.0.0.1` are always included.
        #[arg(long)]
        san: Vec<String>,
        /// Validity, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// The client's identity for a `quic/` endpoint of a secured continuum.
#[derive(clap::Args)]
struct ClientTls {
    /// The continuum's CA certificate (PEM).
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM); its common name must be one of the nodes'
    /// `security.operators`.
    #[arg(long, requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
}

impl ClientTls {
    fn files(&self) -> Option<strata_core::security::TlsFiles> {
        Some(strata_core::security::TlsFiles { ca: self.ca.clone()?, cert: self.cert.clone()?, key: self.key.clone()? })
    }

    /// The files, checked before any link is tried (expired, from another CA, a key of another
    /// certificate): the error names the flag and the file, where Zenoh would only say that it
    /// cannot connect. A `quic/` endpoint (a secured node's) needs them.
    fn checked(&self, endpoint: &str) -> Result<Option<strata_core::security::TlsFiles>, String> {
        use strata_core::security::SecurityError;
        let Some(files) = self.files() else {
            if endpoint.starts_with("quic/") {
                return Err(format!("{endpoint} is a secured node's endpoint: --ca, --cert and --key are required"));
            }
            return Ok(None);
        };
        init_cli_warnings();
        match strata_core::security::check_tls_files(&files, None) {
            Ok(_) => Ok(Some(files)),
            Err(SecurityError::File { field, path, reason }) => {
                let flag = match field {
                    "ca_file" => "--ca",
                    "cert_file" => "--cert",
                    _ => "--key",
                };
                Err(format!("{flag} {}: {reason}", path.display()))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

#[derive(clap::Args)]
struct Resolve {
    /// The escalation's id (the `id` of the escalation record; `strata status --json` lists
    /// each node's `escalations_pending`).
    id: String,
    /// A Zenoh endpoint of the continuum, e.g. `tcp/127.0.0.1:7448` (a fog router).
    #[arg(long, value_parser = endpoint)]
    connect: String,
    /// Who answers (recorded with the resolution). Default: $USER.
    #[arg(long)]
    by: Option<String>,
    /// How long to wait for the node holding the escalation, in ms.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    #[command(flatten)]
    tls: ClientTls,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum LogCommand {
    /// List the streams in a store: origin, incarnation, stream, first/last seq, count,
    /// bytes, watermark, missing, expired, and whether it is a replica.
    Ls {
        /// The store directory (`node.data_dir` of the node's config).
        path: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a stream's envelopes, one per line.
    Tail {
        /// The store directory.
        path: PathBuf,
        /// `stream` (the store's own node) or `origin:stream` (a replica).
        stream: String,
        /// First seq to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only this incarnation (hex, as `log ls` shows it); default every incarnation.
        #[arg(long)]
        incarnation: Option<String>,
        /// Keep printing new envelopes as they are appended (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// With --follow: how long to wait before looking again when nothing new came, in ms.
        /// Each look lists the store's files and, if they changed, opens the store again.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
        poll_ms: u64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// `--connect`: checked as a config's endpoint is, so that a mistyped one is a usage error
/// (exit 2) naming what is wrong, not a connection failure.
fn endpoint(value: &str) -> Result<String, String> {
    strata_core::config::Endpoint::new(value).map(|e| e.as_str().to_owned())
}

const EXIT_CONFIG: u8 = 2;
const EXIT_RUNTIME: u8 = 1;
const EXIT_INTERRUPTED: i32 = 130;

/// Records read per batch by `log tail`.
const TAIL_BATCH_LEN: usize = 512;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { configs } => {
            init_cli_warnings();
            check(configs)
        }
        Command::Run { config, log_format } => run(&config, log_format),
        Command::Status { connect, timeout_ms, json, tls } => status(&connect, timeout_ms, json, &tls),
        Command::Demo(args) => demo::run(args),
        Command::Approve(r) => resolve(r, strata_core::node::escalate::Verdict::Approve),
        Command::Deny(r) => resolve(r, strata_core::node::escalate::Verdict::Deny),
        Command::Log { command: LogCommand::Ls { path, json } } => log_ls(&path, json),
        Command::Log { command: LogCommand::Tail { path, stream, from, incarnation, follow, poll_ms, json } } => {
            let follow = follow.then(|| std::time::Duration::from_millis(poll_ms));
            log_tail(&path, &stream, from, incarnation.as_deref(), follow, json)
        }
        Command::Certs { command: CertsCommand::Init { dir, days } } => certs(strata_core::security::certs::init(&dir, days)),
        Command::Certs { command: CertsCommand::Issue { dir, names, san, days } } => certs(strata_core::security::certs::issue(&dir, &names, &san, days)),
        Command::Acl { configs, node, digest } => acl(&configs, node.as_deref(), digest),
    }
}

fn certs(result: Result<Vec<PathBuf>, strata_core::security::certs::CertError>) -> ExitCode {
    match result {
        Ok(written) => {
            for p in written {
                println!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strata certs: {e}");
            // What was asked for cannot be (a bad name or --days): a usage error.
            let usage = matches!(
                e,
                strata_core::security::certs::CertError::BadName(_)
                    | strata_core::security::certs::CertError::DuplicateName(_)
                    | strata_core::security::certs::CertError::NoDays(_)
                    | strata_core::security::certs::CertError::OutlivesCa { .. }
            );
            ExitCode::from(if usage { EXIT_CONFIG } else { EXIT_RUNTIME })
        }
    }
}

/// `strata acl`: the access control of every node (or one), as JSON, or their digests.
fn acl(paths: &[PathBuf], node: Option<&str>, digest: bool) -> ExitCode {
    use strata_core::security;
    let continuum = match security::load_continuum(paths) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut doc = security::acl_document(&continuum);
    if let Some(node) = node {
        match doc.get(node) {
            Some(one) => doc = serde_json::json!({ node: one }),
            None => {
                eprintln!("strata acl: no node {node:?} among the configs given");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    for (file, c) in &continuum.nodes {
        if !c.security.tls && doc.get(c.node.id.as_str()).is_some() {
            eprintln!("note: {} has security.tls = false: {} applies no access control until it is true", file.display(), c.node.id);
        }
    }
    if digest {
        for (id, acl) in doc.as_object().expect("an object") {
            println!("{id} {}", security::digest(acl));
        }
    } else {
        println!("{}", serde_json::to_string_pretty(&doc).expect("JSON serialises"));
    }
    ExitCode::SUCCESS
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zenoh=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// For the commands other than `run`: Strata's own warnings (a certificate expiring soon, a
/// key others can read) on stderr, nothing else.
fn init_cli_warnings() {
    let filter = tracing_subscriber::EnvFilter::new("off,strata=warn,strata_core=warn");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).without_time().with_target(false).try_init();
}

/// The actor kinds of the `strata` binary: the standard kinds and the device bridges.
fn registry() -> strata_core::Registry {
    let mut r = strata_actors::registry();
    strata_bridges::register(&mut r);
    r
}

/// Loads a config and checks its actors against the registry of kinds.
fn load(path: &std::path::Path) -> Result<NodeConfig, String> {
    let config = NodeConfig::load(path).map_err(|e| e.to_string())?;
    let registry = registry();
    let problems: Vec<String> = config
        .actors
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| registry.check(spec).err().map(|(key, e)| format!("{}: actors[{i}].{key}: {e}", path.display())))
        .collect();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems.join("\n"))
    }
}

fn run(path: &std::path::Path, format: LogFormat) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata run: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        let node = match strata_core::node::Node::start(config, &registry()).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "node failed to start");
                eprintln!("strata run: {}: {e}", path.display());
                // The certificate files and the continuum's configs are configuration too, and
                // so is a `data_dir` that a restart cannot fix (another node's store, a file,
                // something not a store, a store of another format): a problem with them exits
                // 2 (with systemd, `RestartPreventExitStatus=2` then keeps it from restarting
                // into it).
                use strata_core::log::LogError;
                use strata_core::node::NodeError;
                let config_problem = matches!(
                    e,
                    NodeError::Security(_)
                        | NodeError::Log(
                            LogError::WrongNode { .. } | LogError::PathIsFile { .. } | LogError::NotAStore { .. } | LogError::IncompatibleFormat { .. }
                        )
                );
                return ExitCode::from(if config_problem { EXIT_CONFIG } else { EXIT_RUNTIME });
            }
        };
        // Listening from here on, so that no signal falls between two listeners.
        let mut signals = match StopSignals::new() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("strata run: cannot listen for SIGINT/SIGTERM: {e}");
                node.shutdown().await;
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let failed = tokio::select! {
            signal = signals.recv() => {
                tracing::info!(signal, "stopping (a second SIGINT or SIGTERM exits at once)");
                None
            }
            reason = node.failed() => Some(reason),
        };
        if let Some(reason) = &failed {
            // The incident is on the events stream; a process manager restarts us.
            tracing::error!(%reason, "the node failed (the root supervisor gave up, or a part of the node stopped); stopping");
            eprintln!("strata run: {reason}");
        }
        let _impatient = tokio::spawn(exit_at_signal_during_stop(signals));
        node.shutdown().await;
        if failed.is_some() {
            ExitCode::from(EXIT_RUNTIME)
        } else {
            ExitCode::SUCCESS
        }
    })
}

fn status(endpoint: &str, timeout_ms: u64, json: bool, tls: &ClientTls) -> ExitCode {
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    let timeout = std::time::Duration::from_millis(timeout_ms);
    let tls = match tls.checked(endpoint) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("strata status: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut docs = match runtime.block_on(strata_core::bus::query_status(endpoint, tls.as_ref(), timeout)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("strata status: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    docs.sort_by(|a, b| (a["tier"].as_str(), a["node"].as_str()).cmp(&(b["tier"].as_str(), b["node"].as_str())));
    if json {
        println!("{}", serde_json::to_string_pretty(&docs).expect("JSON serialises"));
    } else if !docs.is_empty() {
        print!("{}", strata_core::node::status_table(&docs));
    }
    if docs.is_empty() {
        // The same exit code with --json: a script must not take "nobody answered" for health.
        eprintln!("strata status: no node answered through {endpoint} within {timeout_ms} ms");
        return ExitCode::from(EXIT_RUNTIME);
    }
    ExitCode::SUCCESS
}

/// `strata approve` / `strata deny`: asks every node through `connect`; the one holding the
/// escalation resolves it and says so. Exit 0 if it is now resolved as asked (by this answer or an
/// earlier one), 1 otherwise.
fn resolve(r: Resolve, verdict: strata_core::node::escalate::Verdict) -> ExitCode {
    use strata_core::node::escalate::{self, Resolve as Msg};
    let name = if verdict == escalate::Verdict::Approve { "approve" } else { "deny" };
    let by = r.by.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "operator".into());
    let msg = Msg { id: r.id.clone(), verdict, by };
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    let timeout = std::time::Duration::from_millis(r.timeout_ms);
    let payload = serde_json::to_vec(&msg).expect("serialises");
    let tls = match r.tls.checked(&r.connect) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("strata {name}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let answers = match runtime.block_on(strata_core::bus::query_json(&r.connect, tls.as_ref(), escalate::RESOLVE_ALL, payload, timeout)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("strata {name}: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let Some(answer) = answers.first() else {
        eprintln!(
            "strata {name}: no answer through {} within {} ms: no node reachable there holds escalation {:?}, or its answer came too late \
             (if so it was recorded; `strata status` lists what is still pending)",
            r.connect, r.timeout_ms, r.id
        );
        return ExitCode::from(EXIT_RUNTIME);
    };
    if let Some(e) = answer["error"].as_str() {
        eprintln!("strata {name}: {}: {e}", answer["node"].as_str().unwrap_or("?"));
        return ExitCode::from(EXIT_RUNTIME);
    }
    let (node, outcome, action) = (answer["node"].as_str().unwrap_or("?"), answer["outcome"].as_str().unwrap_or("?"), answer["action"].as_str().unwrap_or("?"));
    let asked = if verdict == escalate::Verdict::Approve { "approved" } else { "denied" };
    if answer["now"].as_bool() == Some(true) {
        println!("{node}: escalation {} {outcome}; action {action}", r.id);
        ExitCode::SUCCESS
    } else if outcome == asked {
        // Asked again (a retry after a lost answer, say): what was asked for holds.
        println!("{node}: escalation {} was already {outcome}; action {action}", r.id);
        ExitCode::SUCCESS
    } else {
        eprintln!("strata {name}: {node}: escalation {} was already resolved: {outcome}, action {action}", r.id);
        ExitCode::from(EXIT_RUNTIME)
    }
}

/// During an orderly stop (which can take tens of seconds: actors, the events, the handover),
/// a (further) SIGINT or SIGTERM ends the process at once, exit code 130. Nothing
/// acknowledged is lost by that (the log is crash-safe); what the stop would have done (the
/// handover, the cursors of the batch in hand) is done by replay and the next start instead.
async fn exit_at_signal_during_stop(mut signals: StopSignals) {
    let signal = signals.recv().await;
    tracing::warn!(signal, "signal during the stop: exiting now");
    eprintln!("strata run: {signal} during the stop: exiting now");
    // _exit, not exit: no atexit handlers or C++ static destructors while RocksDB's and the
    // runtime's threads still run (exit() crashed there, SIGSEGV, one time in three). As a
    // kill would, which the log is made for. stderr is unbuffered: the lines above are out.
    // SAFETY: ends the process; nothing after it runs.
    unsafe { libc::_exit(EXIT_INTERRUPTED) }
}

/// SIGINT and SIGTERM, listened for from when it is made: each one delivered after that is
/// received once, in order.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// The next signal, named.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

fn open_store(path: &std::path::Path) -> Result<RocksStore, ExitCode> {
    RocksStore::open_read_only(path).map_err(|e| {
        eprintln!("strata log: {e}");
        // A path that is no store is the caller's mistake (usage); a store that cannot be
        // read is a failure.
        match e {
            LogError::NotAStore { .. } | LogError::PathIsFile { .. } => ExitCode::from(EXIT_CONFIG),
            _ => ExitCode::from(EXIT_RUNTIME),
        }
    })
}

fn log_ls(path: &std::path::Path, json: bool) -> ExitCode {
    let store = match open_store(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let infos = store.streams();
    if json {
        println!("{}", serde_json::to_string_pretty(&infos).expect("stream infos serialise"));
    } else {
        let earlier = store.earlier_incarnations();
        let earlier = if earlier.is_empty() {
            String::new()
        } else {
            format!("; earlier, after restarts that may have lost records: {}", earlier.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "))
        };
        println!("store {} of node {} (incarnation {}{earlier})", path.display(), store.node(), store.incarnation());
        print!("{}", show::streams_table(&infos));
    }
    ExitCode::SUCCESS
}

/// `follow`: keep looking for new envelopes, this long apart while nothing new comes.
fn log_tail(path: &std::path::Path, stream: &str, from: u64, incarnation: Option<&str>, follow: Option<std::time::Duration>, json: bool) -> ExitCode {
    let store = match open_store(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let wanted = match StreamRef::try_from(stream.to_owned()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata log tail: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let origin = wanted.origin.clone().unwrap_or_else(|| store.node().clone());
    let incarnation = match incarnation.map(|h| u64::from_str_radix(h, 16)) {
        None => None,
        Some(Ok(i)) => Some(i),
        Some(Err(_)) => {
            eprintln!("strata log tail: --incarnation {:?} is not a hex number", incarnation.unwrap_or_default());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let matching = |store: &RocksStore| -> Vec<StreamKey> {
        let mut keys: Vec<StreamKey> = store
            .streams()
            .into_iter()
            .filter(|i| i.origin == origin && i.stream == wanted.stream)
            .filter(|i| incarnation.is_none_or(|inc| i.incarnation.get() == inc))
            .map(|i| i.key())
            .collect();
        // The store's own incarnations in the order it had them (others by id).
        let history = [store.earlier_incarnations(), vec![store.incarnation()]].concat();
        keys.sort_by_key(|k| (k.origin != *store.node(), history.iter().position(|i| *i == k.incarnation), k.incarnation));
        keys
    };
    let mut next: Vec<(StreamKey, u64)> = matching(&store).into_iter().map(|k| (k, from.max(1))).collect();
    if next.is_empty() {
        let known: Vec<String> = store.streams().iter().map(|i| format!("{}:{} (incarnation {})", i.origin, i.stream, i.incarnation)).collect();
        let of_incarnation = incarnation.map(|i| format!(" of incarnation {i:016x}")).unwrap_or_default();
        let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
        if follow.is_none() {
            eprintln!("strata log tail: no stream {origin}:{}{of_incarnation} in {} (streams: {known})", wanted.stream, path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
        // Following a stream that may only appear later: say so, rather than wait in silence
        // on a misspelt name.
        eprintln!("strata log tail: no stream {origin}:{}{of_incarnation} in {} yet; waiting for it (streams: {known})", wanted.stream, path.display());
    }
    loop {
        let mut printed = 0;
        // `seq` is the next to print; 0 once u64::MAX, the last there can be, was printed (only
        // a forged peer's record, in a store written before seqs stopped at SEQ_MAX).
        for (key, seq) in next.iter_mut() {
            while *seq != 0 {
                let read = match store.read(key, *seq, TAIL_BATCH_LEN) {
                    // RocksDB fails a whole read at a damaged table block: the records before
                    // it are printed one at a time, and the error names where it is.
                    Err(LogError::Corrupt { .. }) => store.read(key, *seq, 1),
                    read => read,
                };
                let batch = match read {
                    Ok(b) => b,
                    // A damaged record names itself; anything else (a table block RocksDB
                    // cannot read) is told with where the reading was.
                    Err(e @ LogError::CorruptRecord { .. }) => {
                        eprintln!("strata log tail: {e}");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                    Err(e) => {
                        eprintln!("strata log tail: {e} (reading {key} at #{seq})");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                };
                let Some(last) = batch.last() else { break };
                *seq = last.id.seq.get().checked_add(1).unwrap_or(0);
                printed += batch.len();
                let mut out = std::io::stdout().lock();
                for e in &batch {
                    let line = if json { show::envelope_json(e).to_string() } else { show::envelope_line(e) };
                    // A closed pipe (`| head`) ends the command quietly.
                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                        return ExitCode::SUCCESS;
                    }
                }
            }
        }
        let Some(poll) = follow else {
            return ExitCode::SUCCESS;
        };
        if printed == 0 {
            std::thread::sleep(poll);
            if let Err(e) = store.refresh() {
                eprintln!("strata log tail: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
            for key in matching(&store) {
                if !next.iter().any(|(k, _)| *k == key) {
                    next.push((key, from.max(1)));
                }
            }
        }
    }
}

fn check(files: Vec<PathBuf>) -> ExitCode {
    let mut nodes = Vec::new();
    let mut failed = false;
    for file in files {
        match load(&file) {
            Ok(config) => nodes.push((file, config)),
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    // A secured node's certificate files, their names and its continuum's configs: what
    // `strata run` checks before it opens anything.
    for (file, config) in &nodes {
        if let Err(e) = strata_core::security::NodeSecurity::prepare(config) {
            eprintln!("{}: {e}", file.display());
            failed = true;
        }
    }
    if failed {
        return ExitCode::from(EXIT_CONFIG);
    }
    if nodes.len() == 1 {
        print!("{}", summary_table(&nodes));
        println!("config valid (give several configs to check a continuum)");
        return ExitCode::SUCCESS;
    }
    match check_continuum(nodes) {
        Ok(continuum) => {
            println!("{continuum}");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
