//! A node's run leaves nothing behind, checked from the host's side: `local-cluster --node` (what
//! `make cluster NODE=1` runs) starts a node, runs a pod, relays the API server to the host's
//! loopback; then it is stopped the way a person stops it (Ctrl-C to its process group) and,
//! separately, killed with SIGKILL. Afterwards no process, network or mount namespace, mount,
//! cgroup or directory of the run is left (after SIGKILL, once the next run's sweep has run).
//!
//! Needs root and `make tools`.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use authprobe_harness::{node, tools_bin};

const START_TIMEOUT: Duration = Duration::from_secs(300);

/// A running `local-cluster --node`, in its own process group.
struct Run {
    child: Child,
    kubeconfig: PathBuf,
    stderr: PathBuf,
}

impl Run {
    fn start(stderr: PathBuf) -> Result<Run> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_local-cluster"))
            .arg("--node")
            .arg("--no-crds")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr)?)
            .process_group(0)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut run = Run { child, kubeconfig: PathBuf::new(), stderr };
        let line = rx.recv_timeout(START_TIMEOUT).map_err(|_| run.failure("no `export KUBECONFIG=` line"))?;
        let Some(path) = line.strip_prefix("export KUBECONFIG=") else {
            bail!(run.failure(&format!("unexpected output {line:?}")));
        };
        run.kubeconfig = PathBuf::from(path);
        Ok(run)
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    fn failure(&mut self, what: &str) -> anyhow::Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = fs::read_to_string(&self.stderr).unwrap_or_default();
        anyhow::anyhow!("local-cluster --node: {what}; its stderr:\n{log}")
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(tools_bin().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits (bounded) for the outer process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let exited = Pidfd::open(self.pid()).is_none_or(|fd| fd.wait(timeout));
        if !exited {
            let _ = self.child.kill();
            bail!("local-cluster did not exit within {timeout:?}");
        }
        Ok(self.child.wait()?)
    }
}

/// A process's pidfd: readable once the process has exited.
struct Pidfd(std::os::fd::OwnedFd);

impl Pidfd {
    #[allow(unsafe_code)]
    fn open(pid: i32) -> Option<Pidfd> {
        use std::os::fd::FromRawFd;
        // SAFETY: the pidfd_open system call with flags 0.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // SAFETY: a new descriptor that nothing else owns.
        i32::try_from(fd)
            .ok()
            .filter(|fd| *fd >= 0)
            .map(|fd| Pidfd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// Waits until the process has exited, at most `timeout`; whether it has.
    #[allow(unsafe_code)]
    fn wait(&self, timeout: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&raw mut pfd, 1, ms) == 1 }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What identifies a run from the host: its outer PID and its namespaces' inodes.
struct Footprint {
    outer: i32,
    /// The run's PID 1 (`podutil init`): when it has exited, its PID namespace is empty.
    init: Pidfd,
    pid_ns: String,
    net_ns: String,
    mnt_ns: String,
}

impl Footprint {
    /// Finds the run's first process (the child of `unshare`, the outer process's child).
    fn of(run: &Run) -> Result<Footprint> {
        let outer = run.pid();
        let unshare = children(outer).into_iter().next().context("no unshare process")?;
        let inner = children(unshare).into_iter().next().context("no process inside the namespaces")?;
        let ns =
            |kind: &str| fs::read_link(format!("/proc/{inner}/ns/{kind}")).map(|p| p.display().to_string());
        let init = Pidfd::open(inner).context("no pidfd for the run's PID 1")?;
        let footprint = Footprint { outer, init, pid_ns: ns("pid")?, net_ns: ns("net")?, mnt_ns: ns("mnt")? };
        assert_ne!(footprint.net_ns, fs::read_link("/proc/self/ns/net")?.display().to_string());
        Ok(footprint)
    }

    fn name(&self) -> String {
        format!("authprobe-node-{}", self.outer)
    }

    /// Processes on the host in any of the run's namespaces, exited ones (zombies) included.
    fn processes(&self) -> Vec<String> {
        let ours: BTreeSet<&str> = [self.pid_ns.as_str(), self.net_ns.as_str(), self.mnt_ns.as_str()].into();
        let mut found = Vec::new();
        for pid in all_pids() {
            for kind in ["pid", "net", "mnt"] {
                if let Ok(link) = fs::read_link(format!("/proc/{pid}/ns/{kind}"))
                    && ours.contains(link.display().to_string().as_str())
                {
                    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    let state = fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|s| Some(s.get(s.rfind(')')? + 2..)?.chars().next()?.to_string()))
                        .unwrap_or_default();
                    found.push(format!("{pid} {} state {state} ({kind} namespace)", comm.trim()));
                    break;
                }
            }
        }
        found
    }

    fn cgroups(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else { return Vec::new() };
        entries.flatten().map(|e| e.path().join(self.name())).filter(|p| p.exists()).collect()
    }

    fn dir(&self) -> PathBuf {
        std::env::temp_dir().join(self.name())
    }

    fn host_mounts(&self) -> Vec<String> {
        let dir = self.dir().display().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&dir) || l.contains("/run/containerd"))
            .map(String::from)
            .collect()
    }

    /// Waits (bounded) until the run's PID 1 has exited, which the kernel completes only once
    /// every other process of its PID namespace is gone.
    fn wait_init_gone(&self) {
        self.init.wait(Duration::from_secs(30));
    }

    /// Checks that nothing of the run is left; with `reaped_by_host`, exited processes (zombies)
    /// that only wait for the host's init to reap them are tolerated.
    fn assert_gone(&self, reaped_by_host: bool) -> Result<()> {
        self.wait_init_gone();
        let mut processes = self.processes();
        if reaped_by_host {
            processes.retain(|p| !p.contains(" state Z "));
        }
        let cgroups = self.cgroups();
        let mounts = self.host_mounts();
        let dir = self.dir();
        if !processes.is_empty() || !cgroups.is_empty() || !mounts.is_empty() || dir.exists() {
            bail!(
                "run {} left: processes {processes:?}, cgroups {cgroups:?}, mounts {mounts:?}, directory {} exists: {}",
                self.outer,
                dir.display(),
                dir.exists()
            );
        }
        Ok(())
    }
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

fn children(pid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|stat| {
                // pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'.
                let rest = &stat[stat.rfind(')')? + 2..];
                rest.split(' ').nth(1)?.parse::<i32>().ok()
            }) == Some(pid)
        })
        .collect()
}

/// Starts a pod that keeps running (podutil without arguments pauses), waits until it is Ready,
/// and execs into it through the API server, the kubelet and containerd's stream server.
fn run_a_pod(run: &Run) -> Result<()> {
    run.kubectl(&[
        "run",
        "sleeper",
        "--image",
        node::PODUTIL_IMAGE,
        "--image-pull-policy=Never",
        "--restart=Never",
    ])?;
    run.kubectl(&["wait", "--for=condition=Ready", "pod/sleeper", "--timeout=120s"])?;
    let hostname = run.kubectl(&["exec", "sleeper", "--", "/podutil", "cat", "/etc/hostname"])?;
    assert_eq!(hostname.trim(), "sleeper");
    Ok(())
}

/// One node at a time: two would only compete for the cores.
static ONE_NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn log_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::tempdir()?)
}

#[test]
fn a_node_run_stopped_with_ctrl_c_leaves_nothing() -> Result<()> {
    let _one = ONE_NODE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let logs = log_dir()?;
    let mut run = Run::start(logs.path().join("ctrl-c.log"))?;
    let footprint = Footprint::of(&run)?;
    let nodes = run.kubectl(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
    ])?;
    assert_eq!(nodes, "True", "the node is Ready, seen through the host's relay");
    run_a_pod(&run)?;
    assert!(!footprint.cgroups().is_empty(), "the run has cgroups while it runs");
    assert!(!footprint.processes().is_empty());

    // Ctrl-C: SIGINT to the whole process group, as a terminal sends it.
    // SAFETY: kill(2) on the process group we created.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(-run.pid(), libc::SIGINT);
    }
    run.wait_exit(Duration::from_secs(60))?;
    footprint.assert_gone(false)
}

#[test]
fn a_killed_node_run_is_swept_by_the_next() -> Result<()> {
    let _one = ONE_NODE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let logs = log_dir()?;
    let mut run = Run::start(logs.path().join("sigkill.log"))?;
    let footprint = Footprint::of(&run)?;
    run_a_pod(&run)?;

    // SIGKILL of the outer process alone: its children die with it (parent-death signals), the
    // PID namespace with its first process; the cgroups and the directory stay for the next run.
    run.child.kill()?;
    run.child.wait()?;
    footprint.wait_init_gone();
    assert!(footprint.host_mounts().is_empty());
    node::sweep_stale();
    // The run's PID 1 lost its parent (`unshare`) with the outer process: the host's init reaps it.
    footprint.assert_gone(true)
}

#[test]
fn sweeping_leaves_live_runs_alone() -> Result<()> {
    // A directory named after a live process (this one) is not swept.
    let dir: &Path = &std::env::temp_dir().join(format!("authprobe-node-{}", std::process::id()));
    fs::create_dir_all(dir)?;
    node::sweep_stale();
    let kept = dir.exists();
    fs::remove_dir_all(dir)?;
    assert!(kept);
    Ok(())
}
