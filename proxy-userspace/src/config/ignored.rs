//! kube-proxy's flags that kube-ebpf-proxy accepts but does not act on, so that the command lines
//! of kubeadm's and kops' kube-proxy DaemonSets (and anything written for `kube-proxy --help`)
//! start it unchanged. Each one given is named in one warning saying why it has no effect.
//!
//! The list is kube-proxy's flag set (`cmd/kube-proxy/app/options.go`: its own flags and
//! component-base's logging flags) minus the flags [`super::ProxyFlags`] implements, plus the
//! klog flags older kube-proxy versions took and kops still passes (`--logtostderr`,
//! `--alsologtostderr`, `--log-file`).

use clap::{Arg, ArgAction, ArgMatches, Command};

/// Whether a flag is a Go boolean (`--flag` or `--flag=false`, never `--flag false`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bool,
    Value,
}

/// One accepted-and-ignored flag: its long name, kind, and why it has no effect here.
struct Ignored {
    name: &'static str,
    kind: Kind,
    why: &'static str,
}

const fn flag(name: &'static str, kind: Kind, why: &'static str) -> Ignored {
    Ignored { name, kind, why }
}

const NO_MARKS: &str = "the eBPF dataplane uses no packet marks";
const IPVS: &str = "there are no IPVS rules; the eBPF dataplane is used instead";
const OWN_CONNTRACK: &str =
    "the eBPF dataplane keeps its own connection tracking (see --conntrack-max)";
const LOGGING: &str = "logging is configured with RUST_LOG";
/// Why `--config-sync-period` / `configSyncPeriod` is parsed (and shown in /configz) but changes
/// nothing: kube-proxy hands it to client-go's informers as their resync period.
pub const CONFIG_SYNC_PERIOD: &str = "kube-rs watchers have no informer resync (client-go's \
     only replays its cache as unchanged updates, which kube-proxy's change trackers drop); \
     every --iptables-sync-period a full resync repairs the maps instead, and a broken watch \
     re-lists";
const CLIENT: &str = "kube-rs client defaults are used";

const IGNORED: &[Ignored] = &[
    flag(
        "write-config-to",
        Kind::Value,
        "writing a default configuration is not implemented",
    ),
    flag(
        "init-only",
        Kind::Bool,
        "there is no privileged initialisation step",
    ),
    flag(
        "feature-gates",
        Kind::Value,
        "the behaviour of Kubernetes 1.35's defaults is built in",
    ),
    flag("kube-api-content-type", Kind::Value, CLIENT),
    flag("kube-api-burst", Kind::Value, CLIENT),
    flag("kube-api-qps", Kind::Value, CLIENT),
    flag(
        "bind-address-hard-fail",
        Kind::Bool,
        "failing to bind is always fatal",
    ),
    flag("profiling", Kind::Bool, "there are no pprof handlers"),
    flag(
        "show-hidden-metrics-for-version",
        Kind::Value,
        "there are no hidden metrics",
    ),
    flag("iptables-masquerade-bit", Kind::Value, NO_MARKS),
    flag(
        "iptables-localhost-nodeports",
        Kind::Bool,
        "list localhost in --nodeport-addresses instead",
    ),
    flag("ipvs-sync-period", Kind::Value, IPVS),
    flag("ipvs-min-sync-period", Kind::Value, IPVS),
    flag("ipvs-scheduler", Kind::Value, IPVS),
    flag("ipvs-exclude-cidrs", Kind::Value, IPVS),
    flag("ipvs-strict-arp", Kind::Bool, IPVS),
    flag("ipvs-tcp-timeout", Kind::Value, IPVS),
    flag("ipvs-tcpfin-timeout", Kind::Value, IPVS),
    flag("ipvs-udp-timeout", Kind::Value, IPVS),
    flag(
        "oom-score-adj",
        Kind::Value,
        "set it in the DaemonSet (the kubelet applies it)",
    ),
    flag("conntrack-max-per-core", Kind::Value, OWN_CONNTRACK),
    flag("conntrack-min", Kind::Value, OWN_CONNTRACK),
    flag("conntrack-tcp-be-liberal", Kind::Bool, OWN_CONNTRACK),
    flag(
        "healthz-port",
        Kind::Value,
        "deprecated in kube-proxy; use --healthz-bind-address",
    ),
    flag(
        "metrics-port",
        Kind::Value,
        "deprecated in kube-proxy; use --metrics-bind-address",
    ),
    flag("v", Kind::Value, LOGGING),
    flag("vmodule", Kind::Value, LOGGING),
    flag("logging-format", Kind::Value, LOGGING),
    flag("log-flush-frequency", Kind::Value, LOGGING),
    flag("log-text-split-stream", Kind::Bool, LOGGING),
    flag("log-text-info-buffer-size", Kind::Value, LOGGING),
    flag("log-json-split-stream", Kind::Bool, LOGGING),
    flag("log-json-info-buffer-size", Kind::Value, LOGGING),
    flag("log-file", Kind::Value, LOGGING),
    flag("log-dir", Kind::Value, LOGGING),
    flag("logtostderr", Kind::Bool, LOGGING),
    flag("alsologtostderr", Kind::Bool, LOGGING),
];

/// The warning for flag `--name=value`, accepted but ignored for reason `why`.
pub fn warning(name: &str, value: &str, why: &str) -> String {
    format!("--{name}={value} is accepted for kube-proxy compatibility but ignored: {why}")
}

/// The ignored flags given on the command line, in the order of the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IgnoredFlags {
    given: Vec<(&'static str, &'static str, String)>,
}

impl IgnoredFlags {
    /// One warning per ignored flag given, naming it and its value.
    pub fn warnings(&self) -> Vec<String> {
        self.given
            .iter()
            .map(|(name, why, value)| warning(name, value, why))
            .collect()
    }
}

impl clap::FromArgMatches for IgnoredFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Self::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for ignored in IGNORED {
            if let Some(values) = matches.get_many::<String>(ignored.name) {
                let value = values.cloned().collect::<Vec<_>>().join(",");
                self.given.retain(|(name, _, _)| *name != ignored.name);
                self.given.push((ignored.name, ignored.why, value));
            }
        }
        Ok(())
    }
}

impl clap::Args for IgnoredFlags {
    fn augment_args(mut command: Command) -> Command {
        command = command.next_help_heading("kube-proxy flags accepted and ignored");
        for ignored in IGNORED {
            let mut arg = Arg::new(ignored.name)
                .long(ignored.name)
                .help(format!("Ignored: {}.", ignored.why));
            arg = match ignored.kind {
                Kind::Bool => arg
                    .value_name("BOOL")
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true")
                    .action(ArgAction::Set),
                // pflag lets a flag be repeated (the last wins, slices append).
                Kind::Value => arg.value_name("VALUE").action(ArgAction::Append),
            };
            if ignored.name == "v" {
                arg = arg.short('v');
            }
            command = command.arg(arg);
        }
        command.next_help_heading(None)
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ignored: IgnoredFlags,
    }

    #[test]
    fn every_ignored_flag_is_accepted_and_named_once() {
        for ignored in IGNORED {
            let arg = match ignored.kind {
                Kind::Bool => format!("--{}", ignored.name),
                Kind::Value => format!("--{}=1", ignored.name),
            };
            let cli =
                Cli::try_parse_from(["kube-proxy", &arg]).unwrap_or_else(|e| panic!("{arg}: {e}"));
            let warnings = cli.ignored.warnings();
            assert_eq!(warnings.len(), 1, "{arg}: {warnings:?}");
            assert!(
                warnings[0].starts_with(&format!("--{}=", ignored.name)),
                "{warnings:?}"
            );
        }
    }

    #[test]
    fn go_flag_forms() {
        let cli = Cli::try_parse_from([
            "kube-proxy",
            "--v=2",
            "--conntrack-max-per-core",
            "131072",
            "--logtostderr=false",
            "--alsologtostderr",
            "--ipvs-exclude-cidrs=10.0.0.0/8",
            "--ipvs-exclude-cidrs=192.168.0.0/16",
        ])
        .unwrap();
        assert_eq!(
            cli.ignored.warnings(),
            [
                "--ipvs-exclude-cidrs=10.0.0.0/8,192.168.0.0/16 is accepted for kube-proxy \
                 compatibility but ignored: there are no IPVS rules; the eBPF dataplane is used \
                 instead",
                "--conntrack-max-per-core=131072 is accepted for kube-proxy compatibility but \
                 ignored: the eBPF dataplane keeps its own connection tracking (see \
                 --conntrack-max)",
                "--v=2 is accepted for kube-proxy compatibility but ignored: logging is \
                 configured with RUST_LOG",
                "--logtostderr=false is accepted for kube-proxy compatibility but ignored: \
                 logging is configured with RUST_LOG",
                "--alsologtostderr=true is accepted for kube-proxy compatibility but ignored: \
                 logging is configured with RUST_LOG",
            ]
        );
        let short = Cli::try_parse_from(["kube-proxy", "-v", "4"]).unwrap();
        assert_eq!(short.ignored.given[0].2, "4");
        assert!(
            Cli::try_parse_from(["kube-proxy", "--no-such-flag"]).is_err(),
            "unknown flags stay errors"
        );
    }
}
