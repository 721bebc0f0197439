//! The command line (DESIGN.md's contract): parsing and dispatch. Each command's work lives in
//! its own module; this file only says what users can type.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// peerbuild runs AWS CodeBuild buildspec.yml builds, on this machine or on a pool of peers.
#[derive(Parser, Debug)]
#[command(name = "peerbuild", version, about, long_about = None)]
#[command(
    after_help = "Examples:\n  peerbuild run                      run ./buildspec.yml here\n  peerbuild run examples/c-make --artifacts out\n  peerbuild builds                   list past builds\n  peerbuild logs BUILD_ID            show a build's log"
)]
pub struct Cli {
    /// The data directory (default: $PEERBUILD_DATA_DIR, else ~/.local/share/peerbuild).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a buildspec, showing its phases live.
    #[command(
        after_help = "Examples:\n  peerbuild run\n  peerbuild run examples/shell-junit --env GREETING=hi --artifacts out\n  peerbuild run . --buildspec ci/buildspec.yml --secrets secrets.env --timeout 20m\n  peerbuild run --json | jq -c 'select(.event == \"build_finished\")'\n\nExit status: 0 the build succeeded; 1 it failed or timed out; 2 bad usage or a refused\nbuildspec; 3 peerbuild could not run it (FAULT); 130 stopped by Ctrl-C."
    )]
    Run(Box<RunArgs>),
    /// List the builds this machine has run, newest first.
    #[command(after_help = "Examples:\n  peerbuild builds\n  peerbuild builds --json")]
    Builds {
        /// Print one JSON object per build.
        #[arg(long)]
        json: bool,
    },
    /// Show a build's log (a unique prefix of the build id is enough).
    #[command(
        after_help = "Examples:\n  peerbuild logs myapp:0f3c\n  peerbuild logs myapp:0f3c --json"
    )]
    Logs {
        build_id: String,
        /// Print the events as JSON lines, as `run --json` does.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running build (it ends STOPPED, its processes killed).
    #[command(after_help = "Examples:\n  peerbuild cancel myapp:0f3c")]
    Cancel { build_id: String },
    /// The content-addressed store: import and export folders, statistics, garbage collection.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Run a pool node: find peers, announce this machine, serve the control API.
    #[command(
        after_help = "Examples:\n  peerbuild node\n  peerbuild node --pool-key pool.key --bootstrap /ip4/192.0.2.7/tcp/4001/p2p/12D3KooW...\n  peerbuild node --slots 4 --label gpu=a100 --listen /ip4/0.0.0.0/tcp/4001\n\nStops cleanly on SIGTERM or Ctrl-C (exit status 0)."
    )]
    Node(Box<NodeArgs>),
    /// Private pools: create the key that every member of a pool shares.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Show the pool as the local node sees it: every peer, its slots, labels, load and the age
    /// of its last heartbeat.
    #[command(
        after_help = "Examples:\n  peerbuild status\n  peerbuild status --json\n  peerbuild status --node unix:/var/lib/peerbuild/api.sock\n\nExit status: 0 shown; 3 no node is running (start one with `peerbuild node`)."
    )]
    Status {
        /// The node's API: `unix:PATH` or `http://127.0.0.1:PORT` (default: $PEERBUILD_NODE,
        /// else the node.json in the data directory).
        #[arg(long, value_name = "URL")]
        node: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Internal: the sandbox helper process.
    #[command(name = "__sandbox-helper", hide = true)]
    SandboxHelper {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// `peerbuild cache ...`.
#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Store a folder as a tree and print its digest.
    #[command(
        after_help = "Examples:\n  peerbuild cache import ./node_modules\n  peerbuild cache import build/ --json"
    )]
    Import {
        dir: PathBuf,
        /// Print the outcome as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write a stored tree into a new or empty folder. A tree this store lacks is fetched from
    /// the pool first when a node runs on this data directory.
    #[command(after_help = "Examples:\n  peerbuild cache export 3f2a...9c/1234 ./restored")]
    Export {
        digest: protocol::Digest,
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show what the store holds: objects, stored and logical bytes, ratios.
    #[command(after_help = "Examples:\n  peerbuild cache stat\n  peerbuild cache stat --json")]
    Stat {
        #[arg(long)]
        json: bool,
    },
    /// List the saved cache entries (buildspec `cache:` keys), newest first.
    #[command(after_help = "Examples:\n  peerbuild cache keys\n  peerbuild cache keys --json")]
    Keys {
        #[arg(long)]
        json: bool,
    },
    /// Keep a tree whatever gc decides (until unpinned).
    #[command(after_help = "Examples:\n  peerbuild cache pin 3f2a...9c/1234")]
    Pin { digest: protocol::Digest },
    /// Let gc drop a tree pinned with `cache pin` again.
    #[command(after_help = "Examples:\n  peerbuild cache unpin 3f2a...9c/1234")]
    Unpin { digest: protocol::Digest },
    /// Drop least recently used trees until the store fits in SIZE, then remove unused objects.
    #[command(
        after_help = "Examples:\n  peerbuild cache gc --max-size 20G\n  peerbuild cache gc --max-size 500M"
    )]
    Gc {
        /// The budget: bytes, or with a unit K, M, G, T (powers of 1024).
        #[arg(long, value_parser = parse_size)]
        max_size: u64,
        #[arg(long)]
        json: bool,
    },
}

/// `peerbuild pool ...`.
#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// Write a new pool key (pre-shared key) and print the command that joins another machine.
    #[command(
        after_help = "Examples:\n  peerbuild pool init\n  peerbuild pool init --out /etc/peerbuild/pool.key"
    )]
    Init {
        /// Where to write the key (default: DATA_DIR/pool.key). An existing file is never
        /// overwritten.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `peerbuild node`.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Listen on this address. Repeatable (default: /ip4/0.0.0.0/tcp/0, plus
    /// /ip4/0.0.0.0/udp/0/quic-v1 without a pool key).
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Connect to this peer at start-up (it must end in /p2p/PEER_ID). Repeatable.
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Join the private pool whose key is in FILE (written by `peerbuild pool init`).
    #[arg(long, value_name = "FILE")]
    pub pool_key: Option<PathBuf>,
    /// Builds this node runs at once (default: the number of cores).
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,
    /// Advertise a label that builds can `--require`. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Also serve the control API on this loopback address (127.0.0.1:PORT), with the bearer
    /// token in DATA_DIR/api.token. The Unix socket DATA_DIR/api.sock is always served.
    #[arg(long, value_name = "ADDR")]
    pub api: Option<std::net::SocketAddr>,
    /// Do not discover peers on the local network by mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Accept only these peers (and refuse every other connection). Repeatable.
    #[arg(long, value_name = "PEER_ID")]
    pub allow_peer: Vec<String>,
    /// How often this node announces itself: 1s, 5s, 1m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    pub heartbeat_interval: Duration,
    /// A peer silent for this long is taken as gone (longer than --heartbeat-interval).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "20s")]
    pub lease: Duration,
}

/// Parses `500M`, `20G`, `1024`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}`: write a size such as 500M or 20G"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches(['B', 'I'])
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit; write a size such as 500M or 20G"
            ));
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// `peerbuild run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The source folder (default: the current folder).
    pub dir: Option<PathBuf>,
    /// The buildspec to run (default: DIR/buildspec.yml).
    #[arg(long, value_name = "FILE")]
    pub buildspec: Option<PathBuf>,
    /// Set a variable; beats the buildspec's value. Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read KEY=VALUE lines (values literal); --env beats them.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// Take each string of FILE's JSON list as an --env KEY=VALUE (set by a node running a pool
    /// build, so the values never show on a command line, which every user can read).
    #[arg(long, value_name = "FILE", hide = true)]
    pub env_list: Option<PathBuf>,
    /// NAME=VALUE lines behind parameter-store and secrets-manager entries.
    #[arg(long, value_name = "FILE")]
    pub secrets: Option<PathBuf>,
    /// Stop the build after this long: 90s, 20m, 2h (default 60m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60m")]
    pub timeout: Duration,
    /// Copy the artifacts into this folder (must be empty or absent).
    #[arg(long, value_name = "OUT_DIR")]
    pub artifacts: Option<PathBuf>,
    /// The sandbox: namespace (Linux namespaces, outbound network through slirp4netns but never
    /// to this machine's own addresses; the default unless DATA_DIR/config.toml sets another),
    /// docker (a container of --image through the Docker engine), wasm (each command is a WASI
    /// module in the workspace and its arguments, not shell) or host (no isolation). Your
    /// choice here beats the buildspec's; a buildspec may only ask for sandboxes that
    /// config.toml's sandbox.allow lists.
    #[arg(long, value_name = "KIND")]
    pub sandbox: Option<String>,
    /// The image: for the docker sandbox, a Docker image on this machine (build or `docker
    /// import` it; it overrides the buildspec's peerbuild.image); for the namespace sandbox,
    /// an image's root folder on this machine (an absolute path to a folder holding bin/sh,
    /// which only you can choose, never a buildspec).
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// Run only on a peer with this label. Repeatable.
    #[arg(long, value_name = "LABEL=VALUE")]
    pub require: Vec<String>,
    /// Submit to this node's API (`unix:PATH` or `http://127.0.0.1:PORT`) instead of the one
    /// running on the data directory ($PEERBUILD_NODE works too); the node must share this
    /// data directory's store.
    #[arg(long, value_name = "URL")]
    pub node: Option<String>,
    /// Run on this machine's embedded one-node pool even when a node runs here (its pool's
    /// cache is still used).
    #[arg(long, conflicts_with = "node")]
    pub local: bool,
    /// The sandbox a submitter asked for, checked against this owner's sandbox.allow like a
    /// buildspec's peerbuild.sandbox (set by a node running another peer's build).
    #[arg(long, value_name = "KIND", hide = true)]
    pub sandbox_request: Option<String>,
    /// The commit the source came from (set by a node running another peer's build, whose
    /// source arrives as a tree).
    #[arg(long, value_name = "COMMIT", hide = true)]
    pub source_version: Option<String>,
    /// The build's id, as its submitter numbered it (set by a node running a submitted build).
    #[arg(long, value_name = "ID", hide = true, requires = "build_number")]
    pub build_id: Option<String>,
    #[arg(long, value_name = "N", hide = true, requires = "build_id")]
    pub build_number: Option<u64>,
    /// Keep no record of the build in the data directory (its submitter keeps it).
    #[arg(long, hide = true)]
    pub no_record: bool,
    /// Run only this member of the batch, as its own build (set by a node running one member
    /// of a batch that the pool fans out).
    #[arg(long, value_name = "IDENTIFIER", hide = true)]
    pub batch_member: Option<String>,
    /// Print one JSON event a line (schema: docs/EVENTS.md).
    #[arg(long)]
    pub json: bool,
    /// Batch members run at once (default: the number of cores).
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,
    /// Allow batch members with privileged-mode (in the docker sandbox they get a privileged
    /// container).
    #[arg(long)]
    pub allow_privileged: bool,
    /// Give builds no network: refuse a buildspec with `peerbuild: network: true`, and run the
    /// others with a loopback only (builds get outbound network by default). Not with --sandbox
    /// host, which cannot cut a build off.
    #[arg(long)]
    pub deny_network: bool,
    /// The store's size budget; least recently used trees are dropped past it (default:
    /// $PEERBUILD_STORE_MAX_SIZE, else 20G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub store_max_size: Option<u64>,
}

/// Parses `90s`, `20m`, `2h`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let hint = "write a number with a unit: 90s, 20m or 2h";
    let mut total = 0u64;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(format!("`{text}`: unknown unit `{c}`; {hint}")),
        };
        let value: u64 = digits.parse().map_err(|_| format!("`{text}`: {hint}"))?;
        total = total.saturating_add(value.saturating_mul(unit));
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(format!("`{text}`: {hint}"));
    }
    Ok(Duration::from_secs(total))
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::SandboxHelper { args } => {
            return ExitCode::from(sandbox::helper::main(args).clamp(0, 255) as u8);
        }
        Command::Run(args) => crate::run::run(cli.data_dir.as_deref(), *args),
        Command::Builds { json } => crate::records::list(cli.data_dir.as_deref(), json),
        Command::Logs { build_id, json } => {
            crate::records::logs(cli.data_dir.as_deref(), &build_id, json)
        }
        Command::Cancel { build_id } => crate::records::cancel(cli.data_dir.as_deref(), &build_id),
        Command::Cache(command) => crate::cache_cli::run(cli.data_dir.as_deref(), command),
        Command::Node(args) => crate::pool::run_node(cli.data_dir.as_deref(), *args),
        Command::Pool(PoolCommand::Init { out }) => {
            crate::pool::status::pool_init(cli.data_dir.as_deref(), out.as_deref())
        }
        Command::Status { node, json } => {
            crate::pool::status::status(cli.data_dir.as_deref(), node.as_deref(), json)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("peerbuild: error: {err:#}");
            ExitCode::from(crate::run::EXIT_FAULT)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("20").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("5X").is_err());
        assert!(parse_size("G").is_err());
    }

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
