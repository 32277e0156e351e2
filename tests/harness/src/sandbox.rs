//! The namespaces a node runs in, and the host state it leaves behind.
//!
//! [`enter`] re-executes the current program (a test binary, or `local-cluster`) as
//! `unshare --net --mount --pid --fork --kill-child --mount-proc podutil init <program> <same
//! arguments>` and exits with its status. `podutil init` (tools/podutil) is PID 1 of the new PID
//! namespace: it brings loopback up in the new network namespace (where the node adds the pods'
//! bridge), mounts a fresh tmpfs on `/run` in the private mount namespace (containerd's shim
//! sockets and FIFOs, runc state), runs the program, reaps the orphaned containerd shims and exits
//! with the program's status. When it ends, however it ends, the kernel kills every process of
//! the run (containers and shims included) and drops every mount and the network namespace with
//! them.
//!
//! What survives a run in the host's view is only what is not namespaced: the run's directory
//! (`$TMPDIR/authprobe-node-<pid>`, `<pid>` being the outer process) and its cgroups
//! (`/sys/fs/cgroup/<hierarchy>/authprobe-node-<pid>`, the kubelet's `cgroupRoot`). The outer
//! process removes both when the inner one has exited, and [`sweep_stale`] removes those of runs
//! whose outer process is gone (a SIGKILLed `cargo test`) at the next start.

use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicI32, AtomicU32, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::process;

/// Set in the re-executed process: the outer process's PID, which names the run.
const RUN_ENV: &str = "AUTHPROBE_NODE_RUN";
/// Set in the re-executed process: the run's directory.
const DIR_ENV: &str = "AUTHPROBE_NODE_DIR";
/// Set in the re-executed process when the outer process handed down a listening socket of the
/// host's network namespace (its file descriptor number).
const LISTENER_ENV: &str = "AUTHPROBE_NODE_HOST_LISTENER";
const PREFIX: &str = "authprobe-node-";
const CGROUP_FS: &str = "/sys/fs/cgroup";

/// Whether this process runs inside a node's namespaces (re-executed by [`enter`], or started by
/// a process that was).
pub fn inside() -> bool {
    std::env::var(RUN_ENV).is_ok_and(|id| id.parse::<u32>().is_ok())
}

/// The run's name (`authprobe-node-<outer pid>`) and directory, inside the namespaces.
pub(crate) fn run() -> Result<(String, PathBuf)> {
    let id = std::env::var(RUN_ENV)
        .map_err(|_| anyhow!("not inside a node's namespaces: call node::enter() first"))?;
    let dir = std::env::var_os(DIR_ENV).ok_or_else(|| anyhow!("{DIR_ENV} is not set"))?;
    Ok((format!("{PREFIX}{id}"), PathBuf::from(dir)))
}

/// Inside the namespaces: the listening socket of the host's network namespace that the outer
/// process handed down to [`enter`], once.
pub fn host_listener() -> Option<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    static TAKEN: Mutex<bool> = Mutex::new(false);
    let fd: i32 = std::env::var(LISTENER_ENV).ok()?.parse().ok()?;
    let mut taken = TAKEN.lock().ok()?;
    if *taken || !inside() {
        return None;
    }
    *taken = true;
    // SAFETY: the outer process put this listening socket at this descriptor for us (see
    // `reexec`), and the flag above hands it out once.
    #[allow(unsafe_code)]
    Some(unsafe { std::net::TcpListener::from_raw_fd(fd) })
}

/// Makes sure this process runs inside a node's namespaces.
///
/// Inside, it returns at once. Outside, it re-executes the current program with the same
/// arguments inside new namespaces, waits for it, cleans up after it and **exits** with its
/// status: it does not return. Other threads calling it meanwhile block until the process exits.
/// `host_listener`, a socket of the host's network namespace, is handed down to the re-executed
/// process (see `local-cluster --node`).
///
/// Needs root, util-linux's `unshare` and `podutil` (`make tools`).
pub fn enter(host_listener: Option<&std::net::TcpListener>) -> Result<()> {
    if inside() {
        return Ok(());
    }
    static REEXEC: Mutex<()> = Mutex::new(());
    let _only_one = REEXEC.lock().map_err(|_| anyhow!("an earlier re-execution panicked"))?;
    let code = reexec(host_listener)?;
    std::process::exit(code)
}

fn reexec(host_listener: Option<&std::net::TcpListener>) -> Result<i32> {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    if unsafe { libc::geteuid() } != 0 {
        bail!("a node needs root (network, mount and PID namespaces, cgroups)");
    }
    let init = crate::binary("podutil")?;
    sweep_stale();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("{PREFIX}{pid}"));
    fs::create_dir_all(dir.join("tmp"))?;
    let exe = std::env::current_exe()?;
    let mut command = Command::new("unshare");
    command
        .args(["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--"])
        .arg(&init)
        .arg("init")
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .env(RUN_ENV, pid.to_string())
        .env(DIR_ENV, &dir)
        // Everything the run writes to temporary files stays in its directory, where PIDs are
        // those of its PID namespace (the control plane's stale-directory check relies on them).
        .env("TMPDIR", dir.join("tmp"))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let listener_fd = host_listener.map(std::os::fd::AsRawFd::as_raw_fd);
    if let Some(fd) = listener_fd {
        command.env(LISTENER_ENV, fd.to_string());
    }
    // SAFETY: only async-signal-safe calls (fcntl, signal) between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = listener_fd {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    eprintln!(
        "harness: running {} again inside new network, mount and PID namespaces (a node's run, {})",
        exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        dir.display()
    );
    let mut child = process::spawn_command(command).context("starting unshare (util-linux)")?;
    // `unshare` ignores SIGINT and SIGTERM while it waits. On Ctrl-C or SIGTERM this process asks
    // the run to end (SIGTERM to its PID 1, `podutil init`, which passes it on to the program: a
    // test binary dies at once, local-cluster stops its node), and on a second one, or before
    // PID 1 is known, ends it (SIGKILL to `unshare`; --kill-child takes the run with it). It stays
    // to clean up after the run.
    UNSHARE_PID.store(i32::try_from(child.id()).unwrap_or(0), SeqCst);
    // SAFETY: the handler only calls kill(2), which is async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGINT, end_run as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, end_run as *const () as libc::sighandler_t);
    }
    if let Some(init) = child_of(UNSHARE_PID.load(SeqCst), Duration::from_secs(5)) {
        INIT_PID.store(init, SeqCst);
    }
    let status = child.wait();
    // Neither is ours to signal any more.
    INIT_PID.store(0, SeqCst);
    UNSHARE_PID.store(0, SeqCst);
    let status = status?;
    // The run's PID namespace is gone with its first process: no process of it is left, and with
    // them went its mounts and network namespace. What is left is on the host's filesystems.
    remove_run(pid, &dir);
    use std::os::unix::process::ExitStatusExt;
    if END_REQUESTS.load(SeqCst) > 0 || status.signal().is_some() {
        eprintln!(
            "harness: the node's run was interrupted ({status}); its cgroups and directory are removed"
        );
    }
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

static UNSHARE_PID: AtomicI32 = AtomicI32::new(0);
static INIT_PID: AtomicI32 = AtomicI32::new(0);
static END_REQUESTS: AtomicU32 = AtomicU32::new(0);

extern "C" fn end_run(_signal: libc::c_int) {
    let (init, unshare) = (INIT_PID.load(SeqCst), UNSHARE_PID.load(SeqCst));
    let (pid, signal) = if END_REQUESTS.fetch_add(1, SeqCst) == 0 && init > 0 {
        (init, libc::SIGTERM)
    } else {
        (unshare, libc::SIGKILL)
    };
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; the pid is our child (unshare) or its child
        // (PID 1 of the run), neither reaped while these are set.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// The first child of `parent` (which has just forked it), waiting at most `timeout`: there is no
/// event for a fork of another process, so /proc is polled every few milliseconds.
fn child_of(parent: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'.
            let ppid: i32 = stat.get(stat.rfind(')')? + 2..)?.split(' ').nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        });
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `ip ARGS` (iproute2).
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Detaches every mount at or below `dir` (deepest first). Only ever called inside the run's
/// private mount namespace.
pub(crate) fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for point in points {
        let Ok(c) = CString::new(point.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: a valid NUL-terminated path.
        #[allow(unsafe_code)]
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if bytes[i] == b'\\'
            && let Some(d) = octal
        {
            out.push(d.iter().fold(0u8, |v, b| v.wrapping_mul(8).wrapping_add(b - b'0')));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup hierarchies mounted under `/sys/fs/cgroup` (v1 controllers, `systemd`, `unified`).
fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(CGROUP_FS) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    if out.is_empty() && Path::new(CGROUP_FS).join("cgroup.procs").exists() {
        out.push(PathBuf::from(CGROUP_FS)); // a pure cgroup v2 host
    }
    out
}

/// Creates the run's cgroup `/<name>` in every hierarchy (the kubelet's `cgroupRoot` must exist).
pub(crate) fn create_cgroup(name: &str) -> Result<()> {
    for h in hierarchies() {
        let dir = h.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    Ok(())
}

/// Every process in the run's cgroup tree (in the caller's PID namespace).
pub(crate) fn cgroup_pids(name: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for h in hierarchies() {
        collect_pids(&h.join(name), &mut pids, 0);
    }
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p > 0);
    pids
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>, depth: usize) {
    if depth > 16 {
        return;
    }
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), pids, depth + 1);
            }
        }
    }
}

/// Kills every process in the run's cgroups and removes them, deepest first, in every hierarchy.
pub(crate) fn remove_cgroup(name: &str) {
    kill_and_wait(&cgroup_pids(name), Duration::from_secs(10));
    for h in hierarchies() {
        remove_cgroup_dir(&h.join(name), 0);
    }
}

fn remove_cgroup_dir(dir: &Path, depth: usize) {
    if depth > 16 || !dir.is_dir() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_dir(&e.path(), depth + 1);
            }
        }
    }
    // A cgroup is removed with rmdir (its control files go with it); EBUSY means a process is
    // still in it, which kill_and_wait above has ruled out for the run's own processes.
    if let Err(e) = fs::remove_dir(dir) {
        eprintln!("harness: cannot remove cgroup {}: {e}", dir.display());
    }
}

/// SIGKILLs `pids` and waits (up to `timeout` in all) until each has exited, reaping our children.
pub(crate) fn kill_and_wait(pids: &[i32], timeout: Duration) {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let deadline = Instant::now() + timeout;
    for &pid in pids.iter().filter(|p| **p != me && **p > 0) {
        let fd = pidfd_open(pid);
        // SAFETY: kill(2) with a plain signal number.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        if let Some(fd) = fd {
            let left = deadline.saturating_duration_since(Instant::now());
            wait_readable(fd, left);
            // SAFETY: closing the descriptor pidfd_open returned.
            #[allow(unsafe_code)]
            unsafe {
                libc::close(fd);
            }
        }
        // SAFETY: waitpid on a specific pid; ECHILD when it is not our child, which is fine.
        #[allow(unsafe_code)]
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        }
    }
}

fn pidfd_open(pid: i32) -> Option<i32> {
    // SAFETY: the pidfd_open system call with flags 0.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    i32::try_from(fd).ok().filter(|fd| *fd >= 0)
}

/// Waits until a pidfd turns readable (the process has exited), at most `timeout`.
fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    #[allow(unsafe_code)]
    unsafe {
        libc::poll(&raw mut pfd, 1, ms);
    }
}

/// Processes of this PID namespace whose command name starts with `prefix`.
pub(crate) fn pids_named(prefix: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(prefix)))
        .collect()
}

/// Removes what run `pid` left on the host: its cgroups and its directory (kept for a look
/// when `AUTHPROBE_NODE_KEEP` is set; the next run's sweep removes it).
fn remove_run(pid: u32, dir: &Path) {
    remove_cgroup(&format!("{PREFIX}{pid}"));
    if std::env::var_os("AUTHPROBE_NODE_KEEP").is_some() {
        eprintln!("harness: AUTHPROBE_NODE_KEEP is set: keeping {}", dir.display());
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != ErrorKind::NotFound
    {
        eprintln!("harness: cannot remove {}: {e}", dir.display());
    }
}

/// Removes the directories and cgroups of runs whose outer process is gone.
pub fn sweep_stale() {
    let mut dead = std::collections::BTreeSet::new();
    let mut consider = |name: &str| {
        if let Some(pid) = name.strip_prefix(PREFIX).and_then(|p| p.parse::<u32>().ok())
            && !process::alive(pid)
        {
            dead.insert(pid);
        }
    };
    for root in std::iter::once(std::env::temp_dir()).chain(hierarchies()) {
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                consider(&e.file_name().to_string_lossy());
            }
        }
    }
    for pid in dead {
        eprintln!("harness: removing what node run {pid} left behind");
        remove_run(pid, &std::env::temp_dir().join(format!("{PREFIX}{pid}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }
}
