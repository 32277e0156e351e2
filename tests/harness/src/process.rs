//! Child processes that cannot outlive the process that started them.
//!
//! Every child is spawned from one long-lived supervisor thread with `PR_SET_PDEATHSIG`, because
//! Linux delivers that signal when the *spawning thread* exits: spawning from short-lived test
//! threads would kill the children early, and spawning without it would leave them running when a
//! test binary is killed.

use std::{
    fs::File,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn supervisor() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SUPERVISOR: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SUPERVISOR.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("harness-supervisor".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // The channel never closes (the sender lives in a static), so this thread, and with
                // it every child's parent-death signal, lasts until the process exits.
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("harness: cannot start the supervisor thread: {e}"));
        Mutex::new(tx)
    })
}

/// Spawns `program args` (with `envs` added) with stdout and stderr appended to `log`, killed
/// when this process dies.
pub fn spawn(program: &Path, args: &[String], envs: &[(&str, String)], log: &Path) -> Result<Child> {
    let out = File::options().create(true).append(true).open(log)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    spawn_command(command).with_context(|| format!("starting {}", program.display()))
}

/// Spawns a prepared command from the supervisor thread, killed when this process dies.
pub(crate) fn spawn_command(mut command: Command) -> Result<Child> {
    die_with_parent(&mut command);
    let (tx, rx) = mpsc::channel();
    supervisor()
        .lock()
        .map_err(|_| anyhow!("supervisor lock poisoned"))?
        .send((command, tx))
        .map_err(|_| anyhow!("supervisor thread is gone"))?;
    Ok(rx.recv().map_err(|_| anyhow!("supervisor thread is gone"))??)
}

#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Asks a child to stop (SIGTERM), waits up to `grace`, then kills it.
pub fn stop(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal(child, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills a child at once (SIGKILL), as a crash would.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[allow(unsafe_code)]
fn signal(child: &Child, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether a process with this pid exists.
#[allow(unsafe_code)]
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Runs `f` when the process exits normally (libtest ends with `exit`), where statics are never dropped.
#[allow(unsafe_code)]
pub fn at_exit(f: fn()) {
    static HOOKS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());
    extern "C" fn run_hooks() {
        let hooks = HOOKS.lock().map(|h| h.clone()).unwrap_or_default();
        for hook in hooks {
            hook();
        }
    }
    let mut hooks = match HOOKS.lock() {
        Ok(h) => h,
        Err(poisoned) => poisoned.into_inner(),
    };
    if hooks.is_empty() {
        // SAFETY: registers a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(run_hooks);
        }
    }
    hooks.push(f);
}

/// Picks a free loopback port.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
