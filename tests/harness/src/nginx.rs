//! A real reverse proxy for tests: Debian's nginx (installed by `make tools`), one process per
//! instance on a free loopback port, in the foreground and without a master (`daemon off;`,
//! `master_process off;`), with its prefix, temp paths, pid file and logs in a directory of its
//! own, killed when dropped and when the test process dies.
//!
//! The caller writes only what goes inside `http {}`, usually one `server` listening on the
//! address it is handed:
//!
//! ```no_run
//! # fn demo(parent: &std::path::Path) -> anyhow::Result<()> {
//! let proxy = authprobe_harness::Nginx::start(parent, |listen| {
//!     format!("server {{ listen {listen}; location / {{ proxy_pass http://127.0.0.1:8080; }} }}")
//! })?;
//! # let _ = proxy.url();
//! # Ok(())
//! # }
//! ```

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::process;

/// How long nginx may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running nginx; killed when dropped.
#[derive(Debug)]
pub struct Nginx {
    addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

/// The nginx binary: `AUTHPROBE_NGINX`, else Debian's `/usr/sbin/nginx`, else `nginx` on `PATH`.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("AUTHPROBE_NGINX") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nginx")).collect::<Vec<_>>())
        .unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/sbin/nginx"))
        .chain(on_path)
        .find(|p| p.is_file())
        .context("nginx is not installed: run `make tools` (it installs Debian's nginx)")
}

impl Nginx {
    /// Starts nginx in a new directory under `parent` (so that scans of `parent` cover its logs)
    /// with `http` as the body of its `http {}` block, given the address to listen on; waits
    /// until it accepts connections. Blocking.
    pub fn start(parent: &Path, http: impl FnOnce(SocketAddr) -> String) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], process::free_port()?));
        let dir = parent.join(format!("nginx-{}", addr.port()));
        fs::create_dir_all(dir.join("tmp"))?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n\
             proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n\
             uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n{}\n}}\n",
            http(addr)
        );
        fs::write(dir.join("nginx.conf"), conf)?;
        let args: Vec<String> = vec![
            "-p".into(),
            format!("{d}/"),
            "-c".into(),
            format!("{d}/nginx.conf"),
            // Before the configuration is read, errors go here rather than to /var/log/nginx.
            "-e".into(),
            format!("{d}/error.log"),
        ];
        let child = process::spawn(&binary()?, &args, &[], &dir.join("stdout.log"))?;
        let mut nginx = Self { addr, dir, child };
        nginx.wait_listening()?;
        Ok(nginx)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("nginx exited with {status}:\n{}", self.error_log());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx did not listen on {} within {READY_TIMEOUT:?}:\n{}",
                    self.addr,
                    self.error_log()
                );
            }
            // A port opening in another process raises no event to wait on.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its directory: configuration, logs, temp files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its error log so far.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Its access log so far (nginx's `combined` format: no request headers).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        process::kill(&mut self.child);
    }
}
