//! A network namespace with a veth pair to the host, made by a test (root only), so that a
//! firewall rule can silently drop a tunnel's packets mid-session or block one port, and name
//! resolution can differ from the host's. Removed when dropped.

use std::process::{Command, Stdio};

/// A namespace `name` whose interface has `inner` and reaches the host at `outer`.
pub struct NetNs {
    pub name: String,
    /// The host's address on the veth pair (where the SaaS listens for the namespace).
    pub outer: std::net::Ipv4Addr,
    /// The namespace's address.
    pub inner: std::net::Ipv4Addr,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Makes the namespace, or says why it cannot be made here (not root, no `ip`).
    pub fn create() -> Result<NetNs, String> {
        let n: u16 = rand::random::<u16>() % 60_000;
        let (a, b) = ((n / 64) as u8, ((n % 64) * 4) as u8);
        let name = format!("pcgt{n}");
        let outer = std::net::Ipv4Addr::new(10, 213, a, b + 1);
        let inner = std::net::Ipv4Addr::new(10, 213, a, b + 2);
        let (h, i) = (format!("pcgh{n}"), format!("pcgi{n}"));
        run(&["ip", "netns", "add", &name])?;
        let ns = NetNs { name, outer, inner };
        let setup = || -> Result<(), String> {
            run(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &i])?;
            run(&["ip", "link", "set", &i, "netns", &ns.name])?;
            run(&["ip", "addr", "add", &format!("{outer}/30"), "dev", &h])?;
            run(&["ip", "link", "set", &h, "up"])?;
            ns.exec(&["ip", "addr", "add", &format!("{inner}/30"), "dev", &i])?;
            ns.exec(&["ip", "link", "set", &i, "up"])?;
            ns.exec(&["ip", "link", "set", "lo", "up"])
        };
        setup()?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Drops every packet in and out of the namespace, without a reset: a silent drop.
    pub fn blackhole(&self) -> Result<(), String> {
        let rules = "table inet pcgdrop {\n chain in { type filter hook input priority 0; policy drop; }\n chain out { type filter hook output priority 0; policy drop; }\n}\n";
        let file = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&file, rules).map_err(|e| e.to_string())?;
        let r = self.exec(&["nft", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        r
    }

    /// Lets packets through again.
    pub fn restore(&self) -> Result<(), String> {
        self.exec(&["nft", "delete", "table", "inet", "pcgdrop"])
    }

    /// Silently drops TCP packets from the namespace to `port` of `addr` (a firewall blocking
    /// one port without a reset).
    pub fn block_tcp(&self, addr: std::net::Ipv4Addr, port: u16) -> Result<(), String> {
        let rules = format!(
            "table inet pcgblock {{\n chain out {{ type filter hook output priority 0; ip daddr {addr} tcp dport {port} drop; }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("{}-block.nft", self.name));
        std::fs::write(&file, rules).map_err(|e| e.to_string())?;
        let r = self.exec(&["nft", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        r
    }

    /// Removes the rules [`block_tcp`](Self::block_tcp) added.
    pub fn unblock(&self) -> Result<(), String> {
        self.exec(&["nft", "delete", "table", "inet", "pcgblock"])
    }

    /// Writes `/etc/netns/<name>/<file>`, which `ip netns exec` puts in place of `/etc/<file>`
    /// for the commands it runs (`hosts`, `resolv.conf`): name resolution of this namespace
    /// only.
    pub fn set_etc(&self, file: &str, contents: &str) -> Result<(), String> {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::write(dir.join(file), contents).map_err(|e| format!("{file}: {e}"))
    }

    /// The command prefix that runs a program in this namespace.
    pub fn prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Removing the namespace removes its end of the veth pair, and so the pair.
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&self.name));
    }
}

/// A namespace for a test that needs one: `Some` when it could be made; `None` (after a loud
/// message) when namespaces cannot be made here (not root) and `PCG_REQUIRE_PEERS` is unset.
pub fn for_test(what: &str) -> Option<NetNs> {
    match NetNs::create() {
        Ok(ns) => Some(ns),
        Err(why) => {
            assert!(
                std::env::var_os("PCG_REQUIRE_PEERS").is_none(),
                "{what} needs a network namespace, which cannot be made here ({why}), and PCG_REQUIRE_PEERS is set"
            );
            eprintln!("!!!!!!!! SKIPPED: {what} needs a network namespace (root): {why} !!!!!!!!");
            None
        }
    }
}
