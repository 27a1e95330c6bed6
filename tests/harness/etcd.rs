//! Real etcd servers for the compatibility-mode tests: one member or
//! several, on free loopback ports, in a temporary directory, killed when
//! dropped. The binaries come from `tools/install-etcd` (Debian's 3.4,
//! PyPI's 3.5), run once per test process when they are missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::{free_port, poll_until, register_log, tail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V3_4,
    V3_5,
}

impl Version {
    fn dir(self) -> &'static str {
        match self {
            Version::V3_4 => "3.4",
            Version::V3_5 => "3.5",
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the client crate sits in the workspace")
        .to_path_buf()
}

/// The etcd server binary of `version`, installed on first use.
pub fn binary(version: Version) -> PathBuf {
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _one = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace();
    let bin = root.join("target/etcd").join(version.dir()).join("etcd");
    if !bin.exists() {
        let out = Command::new(root.join("tools/install-etcd"))
            .arg(root.join("target/etcd"))
            .output()
            .expect("run tools/install-etcd");
        assert!(
            out.status.success() && bin.exists(),
            "tools/install-etcd failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    bin
}

/// etcdctl (3.5), for what the tests do to etcd behind piehole's back.
pub fn etcdctl() -> PathBuf {
    binary(Version::V3_5);
    workspace().join("target/etcd/3.5/etcdctl")
}

/// Certificates made with the openssl command for one test: a CA, a
/// server certificate for 127.0.0.1, and a client certificate for `root`.
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    pub fn make(dir: &Path) -> Tls {
        super::tools::require("openssl", "openssl");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=piehole test CA",
        ]);
        for (name, cn, ext) in [
            (
                "server",
                "etcd",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "root", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write ext");
            run(&[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{name}-key.pem"),
                "-out", &format!("{name}.csr"), "-subj", &format!("/CN={cn}"),
            ]);
            run(&[
                "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey",
                "ca.key", "-CAcreateserial", "-out", &format!("{name}.pem"), "-days", "2",
                "-extfile", &format!("{name}.ext"),
            ]);
        }
        Tls {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of real processes.
pub struct Etcd {
    pub version: Version,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// Extra flags for every member (e.g. authentication is set up later
    /// through etcdctl, not here).
    initial_cluster: String,
    /// Clients must speak TLS and show a certificate of this CA.
    pub tls: Option<Tls>,
    /// More flags for every member.
    extra: Vec<String>,
}

impl Etcd {
    /// `n` members, started and answering.
    pub fn start(n: usize, version: Version) -> Etcd {
        Etcd::start_inner(n, version, false, &[])
    }

    /// One member with more flags.
    pub fn start_with(version: Version, extra: &[&str]) -> Etcd {
        Etcd::start_inner(1, version, false, extra)
    }

    /// One member that serves clients over TLS only and requires a client
    /// certificate signed by its CA (`tls`).
    pub fn start_tls(version: Version) -> Etcd {
        Etcd::start_inner(1, version, true, &[])
    }

    fn start_inner(n: usize, version: Version, tls: bool, extra: &[&str]) -> Etcd {
        // A port handed out by free_port() can be taken by someone else
        // before etcd binds it: then start over on fresh ports.
        for attempt in 0.. {
            match Etcd::try_start(n, version, tls, extra) {
                Ok(e) => return e,
                Err(why) if attempt < 3 => eprintln!("etcd start: {why}; again on other ports"),
                Err(why) => panic!("etcd did not start: {why}"),
            }
        }
        unreachable!()
    }

    fn try_start(n: usize, version: Version, tls: bool, extra: &[&str]) -> Result<Etcd, String> {
        binary(version);
        let dir = tempfile::Builder::new()
            .prefix("piehole-etcd-")
            .tempdir()
            .expect("tempdir");
        let members: Vec<Member> = (1..=n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                data: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("etcd-{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let tls = tls.then(|| Tls::make(dir.path()));
        let mut e = Etcd {
            version,
            dir,
            members,
            initial_cluster,
            tls,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            e.spawn(i);
        }
        let healthy = super::poll(super::POLL_EVERY, Duration::from_secs(30), || {
            for m in &mut e.members {
                if let Some(Ok(Some(status))) = m.child.as_mut().map(Child::try_wait) {
                    m.child = None;
                    return Some(Err(format!(
                        "{} exited ({status}): {}",
                        m.name,
                        tail(&m.log, 1000)
                    )));
                }
            }
            let out = e.ctl(&["endpoint", "health", "--command-timeout=1s"]);
            out.status.success().then_some(Ok(()))
        });
        match healthy {
            Some(Ok(())) => Ok(e),
            Some(Err(why)) => Err(why),
            None => Err(format!("not healthy within 30 s:\n{}", e.logs())),
        }
    }

    fn spawn(&mut self, i: usize) {
        let bin = binary(self.version);
        let m = &self.members[i];
        register_log(&m.log);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log");
        let scheme = self.scheme();
        let mut cmd = Command::new(bin);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        cmd.args(&self.extra);
        let child = cmd
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &m.data.display().to_string(),
                "--listen-client-urls",
                &format!("{scheme}://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:{}", m.client),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &format!("piehole-test-{}", self.members[0].client),
            ])
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `--etcd` for piehole: every member's client URL.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s client address (0-based), e.g. to put a proxy before it.
    pub fn client_addr(&self, i: usize) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.members[i].client)
            .parse()
            .expect("a loopback address")
    }

    /// The member (0-based) that leads etcd's Raft now.
    pub fn leader(&self) -> usize {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]);
        assert!(out.status.success(), "etcdctl endpoint status: {out:?}");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("etcdctl prints JSON");
        let leader = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["Status"]["header"]["member_id"] == e["Status"]["leader"])
            .and_then(|e| e["Endpoint"].as_str().map(String::from))
            .expect("a member that leads");
        self.members
            .iter()
            .position(|m| leader.ends_with(&format!(":{}", m.client)))
            .expect("the leader is one of ours")
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "/no-such-key", "-w", "json"]);
        assert!(out.status.success(), "etcdctl get: {out:?}");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("etcdctl prints JSON");
        v["header"]["revision"].as_i64().expect("a revision")
    }

    /// How many keys start with `prefix`.
    pub fn count(&self, prefix: &str) -> u64 {
        // etcd reports the whole range's count however few keys it sends.
        let out = self.ctl(&[
            "get",
            "--prefix",
            prefix,
            "--keys-only",
            "--limit",
            "1",
            "-w",
            "json",
        ]);
        assert!(out.status.success(), "etcdctl get --prefix: {out:?}");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("etcdctl prints JSON");
        v["count"].as_u64().unwrap_or(0)
    }

    /// etcdctl against the members still running (v3 API), captured.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let endpoints = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(etcdctl());
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        cmd.arg("--endpoints")
            .arg(endpoints)
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl")
    }

    /// Until every running member says it is healthy.
    pub fn wait_healthy(&self) {
        poll_until("etcd members are healthy", Duration::from_secs(30), || {
            let out = self.ctl(&["endpoint", "health", "--command-timeout=1s"]);
            out.status.success().then_some(())
        });
    }

    /// SIGKILL member `i` (0-based).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        self.spawn(i);
    }

    /// Every member's log tail, for failure messages.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {}\n{}", m.name, tail(&m.log, 2000)))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
