//! Starts and stops the real Redfish peer for the tests: sushy-emulator behind TLS (rcgen CA and
//! leaf) with bcrypt htpasswd basic auth, and a local HTTP server for virtual-media images.
//! Every process binds 127.0.0.1 on a free port and is killed by PID on drop.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcg_provider::{BmcEndpoint, TlsTrust};

pub const USER: &str = "admin";
pub const PASSWORD: &str = "s3cret-pw";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The sushy venv's bin directory, or None (with a loud skip message) when it is not installed
/// and `PCG_REQUIRE_PEERS` is unset. With `PCG_REQUIRE_PEERS` set, a missing peer fails the test.
pub fn venv_bin() -> Option<PathBuf> {
    let peers = std::env::var_os("PCG_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".pcg-peers"));
    let bin = peers.join("venv/bin");
    if bin.join("sushy-emulator").is_file() {
        return Some(bin);
    }
    if std::env::var_os("PCG_REQUIRE_PEERS").is_some() {
        panic!(
            "sushy-emulator not found at {} and PCG_REQUIRE_PEERS is set: run scripts/peers/install-redfish.sh",
            bin.display()
        );
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED: sushy-emulator not found at {} — run scripts/peers/install-redfish.sh (set PCG_REQUIRE_PEERS=1 to fail instead) !!!!!!!!\n",
        bin.display()
    );
    None
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free loopback port")
}

/// A child process killed (by its PID) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `ready` until true (panics with the log after `bound` or if the process exits).
    fn wait_ready(
        &mut self,
        what: &str,
        bound: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if ready() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{what} exited with {status} before answering:
{}",
                    self.log_tail()
                ));
            }
            if start.elapsed() > bound {
                return Err(format!(
                    "{what} did not answer within {bound:?}:
{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
    let out = std::fs::File::create(&log).expect("create log");
    let err = out.try_clone().expect("clone log handle");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn peer");
    Proc { child, log }
}

/// Test PKI: a CA and a server certificate for 127.0.0.1 / localhost signed by it.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_sha256: String,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pcg test BMC CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA cert");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    let cert = params.signed_by(&key, &ca).expect("server cert");
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_sha256: pcg_redfish::tls::cert_sha256(cert.der()),
    }
}

/// A self-signed server certificate for 127.0.0.1 / localhost marked CA:TRUE, as many BMCs
/// make them; `ca_pem` is the certificate itself.
pub fn self_signed_ca_pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bmc.example self-signed");
    let cert = params.self_signed(&key).expect("self-signed cert");
    Pki {
        ca_pem: cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_sha256: pcg_redfish::tls::cert_sha256(cert.der()),
    }
}

/// A running sushy-emulator with its files.
pub struct Sushy {
    pub proc: Proc,
    pub port: u16,
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
}

impl Sushy {
    /// Starts sushy-emulator (three fake systems) behind TLS and basic auth, or None to skip.
    pub fn start() -> Option<Sushy> {
        Self::start_with(pki())
    }

    /// Like [`Sushy::start`], serving the certificate of `pki`.
    pub fn start_with(pki: Pki) -> Option<Sushy> {
        let bin = venv_bin()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path();
        std::fs::write(run.join("cert.pem"), &pki.cert_pem).expect("write cert");
        std::fs::write(run.join("key.pem"), &pki.key_pem).expect("write key");
        // bcrypt (cost 4: sushy checks it on every request) through the venv's own bcrypt module.
        let out = Command::new(bin.join("python"))
            .args([
                "-c",
                "import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(rounds=4)).decode())",
                PASSWORD,
            ])
            .output()
            .expect("run python bcrypt");
        assert!(
            out.status.success(),
            "bcrypt: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hash = String::from_utf8(out.stdout).expect("utf8 hash");
        std::fs::write(run.join("htpasswd"), format!("{USER}:{}\n", hash.trim()))
            .expect("htpasswd");
        let mut last = String::new();
        for _ in 0..3 {
            // A free port can be taken by another test between choosing and binding: try again.
            let port = free_port();
            match Self::spawn_on(&bin, run, port) {
                Ok(proc) => {
                    return Some(Sushy {
                        proc,
                        port,
                        pki,
                        dir,
                        bin,
                    })
                }
                Err(e) => last = e,
            }
        }
        panic!("sushy-emulator did not start: {last}");
    }

    fn spawn_on(bin: &Path, run: &Path, port: u16) -> Result<Proc, String> {
        let tmpl = std::fs::read_to_string(
            repo_root().join("scripts/peers/redfish/sushy-emulator.conf.in"),
        )
        .expect("read sushy-emulator.conf.in");
        let conf = tmpl
            .replace("@PORT@", &port.to_string())
            .replace("@RUN@", &run.display().to_string())
            .replace("@CERT@", &format!("'{}'", run.join("cert.pem").display()))
            .replace("@KEY@", &format!("'{}'", run.join("key.pem").display()));
        std::fs::write(run.join("sushy.conf"), conf).expect("write conf");
        std::fs::create_dir_all(run.join("tmp")).expect("tmp dir");
        let mut proc = spawn(
            Command::new(bin.join("sushy-emulator"))
                .arg("--config")
                .arg(run.join("sushy.conf"))
                .env("TMPDIR", run.join("tmp")),
            run.join("sushy.log"),
        );
        proc.wait_ready("sushy-emulator", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(proc)
    }

    pub fn endpoint(&self) -> BmcEndpoint {
        let mut ep = BmcEndpoint::new(format!("https://127.0.0.1:{}", self.port), USER, PASSWORD);
        ep.tls = Some(TlsTrust::CaPem(self.pki.ca_pem.clone()));
        ep.timeout_ms = Some(10_000);
        ep
    }
}

/// A local HTTP server for virtual-media images.
pub struct ImageServer {
    pub proc: Proc,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl ImageServer {
    pub fn start(python: &Path) -> ImageServer {
        let dir = tempfile::tempdir().expect("tempdir");
        // A small stand-in ISO: sushy only downloads and stores it.
        std::fs::write(dir.path().join("boot.iso"), vec![0u8; 64 * 1024]).expect("write iso");
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            match Self::spawn_on(python, dir.path(), port) {
                Ok(proc) => {
                    return ImageServer {
                        proc,
                        url: format!("http://127.0.0.1:{port}/boot.iso"),
                        _dir: dir,
                    }
                }
                Err(e) => last = e,
            }
        }
        panic!("http.server did not start: {last}");
    }

    fn spawn_on(python: &Path, dir: &Path, port: u16) -> Result<Proc, String> {
        let mut proc = spawn(
            Command::new(python)
                .args(["-m", "http.server", "--bind", "127.0.0.1"])
                .arg(port.to_string())
                .arg("--directory")
                .arg(dir),
            dir.join(format!("http-{port}.log")),
        );
        proc.wait_ready("http.server", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(proc)
    }
}
