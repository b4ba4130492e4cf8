//! Real HTTP proxies for the tunnel tests: squid (Debian `squid-openssl`, installed by
//! `scripts/peers/install-network.sh`) on 127.0.0.1 and a free port, from the templates in
//! `scripts/peers/squid/`: plain CONNECT, Basic auth, a refused port, and a TLS-inspecting
//! ssl_bump proxy with its own CA. Stopped by PID when dropped.

use crate::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What kind of proxy to run.
pub enum Kind {
    Connect,
    /// Basic auth with one user.
    Auth {
        user: String,
        password: String,
    },
    /// CONNECT to this port refused (403).
    Deny {
        port: u16,
    },
    /// TLS inspection; `origin_ca` is the SaaS CA (PEM file) squid must trust;
    /// `upgrades`: whether WebSocket upgrades pass.
    Bump {
        origin_ca: PathBuf,
        upgrades: bool,
    },
}

/// A running squid.
pub struct Squid {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The proxy's TLS-inspection CA (PEM file), for `Kind::Bump`.
    pub ca_pem: Option<PathBuf>,
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

impl Squid {
    /// Starts squid, or returns None (loudly) when it is not installed and `PCG_REQUIRE_PEERS`
    /// is unset.
    pub fn start(kind: Kind) -> Option<Squid> {
        if !Path::new("/usr/sbin/squid").exists() {
            assert!(
                std::env::var_os("PCG_REQUIRE_PEERS").is_none(),
                "squid missing and PCG_REQUIRE_PEERS is set: run scripts/peers/install-network.sh"
            );
            eprintln!(
                "!!!!!!!! SKIPPED: squid missing — run scripts/peers/install-network.sh !!!!!!!!"
            );
            return None;
        }
        let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/peers/squid");
        let mut dir = tempfile::Builder::new()
            .prefix("pcg-squid-")
            .tempdir()
            .expect("tempdir");
        if std::env::var_os("PCG_KEEP_TEST_DIRS").is_some() {
            dir.disable_cleanup(true);
            eprintln!("squid directory kept: {}", dir.path().display());
        }
        // Started as root, squid runs as its own user, which must write here.
        chmod(dir.path(), 0o777);
        let d = dir.path().display().to_string();
        let port = free_port();
        let template = |name: &str| {
            std::fs::read_to_string(recipes.join(name))
                .expect("squid template")
                .replace("@DIR@", &d)
                .replace("@PORT@", &port.to_string())
        };
        std::fs::write(dir.path().join("common.conf"), template("common.conf.in")).expect("conf");
        let mut ca_pem = None;
        let conf = match &kind {
            Kind::Connect => template("connect.conf.in"),
            Kind::Auth { user, password } => {
                let hash = Command::new("openssl")
                    .args(["passwd", "-apr1", password])
                    .output()
                    .expect("openssl passwd");
                let line = format!("{user}:{}", String::from_utf8_lossy(&hash.stdout).trim());
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{line}\n")).expect("htpasswd");
                chmod(&htpasswd, 0o644);
                template("auth.conf.in")
            }
            Kind::Deny { port } => {
                template("deny.conf.in").replace("@DENY_PORT@", &port.to_string())
            }
            Kind::Bump {
                origin_ca,
                upgrades,
            } => {
                let (cert, key) = bump_ca();
                let (c, k, o) = (
                    dir.path().join("ca.pem"),
                    dir.path().join("ca.key"),
                    dir.path().join("origin-ca.pem"),
                );
                std::fs::write(&c, cert).expect("ca");
                std::fs::write(&k, key).expect("ca key");
                std::fs::copy(origin_ca, &o).expect("origin ca");
                for f in [&c, &k, &o] {
                    chmod(f, 0o644);
                }
                let db = dir.path().join("ssl_db");
                let ok = Command::new("/usr/lib/squid/security_file_certgen")
                    .args(["-c", "-s"])
                    .arg(&db)
                    .args(["-M", "4MB"])
                    .status()
                    .expect("certgen")
                    .success();
                assert!(ok, "security_file_certgen -c failed");
                let _ = Command::new("chown")
                    .args(["-R", "proxy:proxy"])
                    .arg(&db)
                    .status();
                ca_pem = Some(c.clone());
                template("bump.conf.in")
                    .replace("@CA_CERT@", &c.display().to_string())
                    .replace("@CA_KEY@", &k.display().to_string())
                    .replace("@ORIGIN_CA@", &o.display().to_string())
                    .replace(
                        "@UPGRADES@",
                        if *upgrades {
                            "http_upgrade_request_protocols OTHER allow all"
                        } else {
                            ""
                        },
                    )
            }
        };
        let conf_path = dir.path().join("squid.conf");
        std::fs::write(&conf_path, conf).expect("squid.conf");
        chmod(&conf_path, 0o644);
        let child = Command::new("/usr/sbin/squid")
            .arg("-N")
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("stderr.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .expect("spawn squid");
        let mut me = Squid {
            child,
            port,
            dir,
            ca_pem,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let log = std::fs::read_to_string(me.dir.path().join("cache.log")).unwrap_or_default();
            if log.contains("Socket connections at") {
                return Some(me);
            }
            if let Ok(Some(st)) = me.child.try_wait() {
                panic!(
                    "squid exited ({st}):\n{log}\n{}",
                    std::fs::read_to_string(me.dir.path().join("stderr.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = me.child.kill();
        panic!("squid did not start within 30 s");
    }

    /// `http://127.0.0.1:PORT` with optional credentials.
    pub fn url(&self, auth: Option<(&str, &str)>) -> String {
        match auth {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The access log (one line per request it handled).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA for the inspecting proxy (RSA, made by openssl as proxies' CAs usually are):
/// `(cert PEM, key PEM)`.
fn bump_ca() -> (String, String) {
    let d = tempfile::tempdir().expect("tempdir");
    let (c, k) = (d.path().join("ca.pem"), d.path().join("ca.key"));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .arg("-keyout")
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .args([
            "-subj",
            "/CN=Inspecting Proxy Test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl req")
        .success();
    assert!(ok, "openssl could not make the proxy CA");
    (
        std::fs::read_to_string(c).expect("ca"),
        std::fs::read_to_string(k).expect("key"),
    )
}
