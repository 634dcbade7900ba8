//! Flags shared by the cluster commands (`rwkv worker`, `rwkv router`): where etcd is.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use rwkv_cluster::{EtcdRegistry, EtcdSecurity, RegistryError};
use serde::Deserialize;

#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. `http://127.0.0.1:2379`).
    #[arg(long, env = "RWKV_ETCD")]
    pub etcd: Option<String>,
    /// Key prefix of this cluster in etcd [default: /rwkv].
    #[arg(long, env = "RWKV_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// Seconds after which a dead worker's record expires [default: 5].
    #[arg(long, env = "RWKV_LEASE_TTL")]
    pub lease_ttl: Option<u64>,
    /// PEM CA that signed etcd's certificate: talk TLS to etcd (`https://` endpoints).
    #[arg(long, env = "RWKV_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM certificate chain this process presents to etcd (with --etcd-key), for etcd's
    /// `--client-cert-auth`.
    #[arg(long, env = "RWKV_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "RWKV_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd's authentication); its password is in --etcd-password-file.
    #[arg(long, env = "RWKV_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// File whose first line is the password of --etcd-user.
    #[arg(long, env = "RWKV_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

const MIN_LEASE_TTL: u64 = 2;
const MAX_LEASE_TTL: u64 = 3600;

impl EtcdArgs {
    pub fn or(self, file: EtcdArgs) -> Self {
        Self {
            etcd: self.etcd.or(file.etcd),
            etcd_prefix: self.etcd_prefix.or(file.etcd_prefix),
            lease_ttl: self.lease_ttl.or(file.lease_ttl),
            etcd_ca: self.etcd_ca.or(file.etcd_ca),
            etcd_cert: self.etcd_cert.or(file.etcd_cert),
            etcd_key: self.etcd_key.or(file.etcd_key),
            etcd_user: self.etcd_user.or(file.etcd_user),
            etcd_password_file: self.etcd_password_file.or(file.etcd_password_file),
        }
    }

    /// TLS and user settings for etcd, read and checked (files that cannot be read, a
    /// certificate without its key, a user without a password are errors).
    pub fn security(&self) -> anyhow::Result<EtcdSecurity> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let client_identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => anyhow::bail!("--etcd-cert and --etcd-key go together"),
        };
        anyhow::ensure!(
            client_identity.is_none() || self.etcd_ca.is_some(),
            "--etcd-cert needs --etcd-ca (client certificates are only sent over TLS)"
        );
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let password = text
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_end()
                    .to_owned();
                anyhow::ensure!(
                    !password.is_empty(),
                    "{}: the etcd password file is empty",
                    file.display()
                );
                Some((user.clone(), password))
            }
            (None, None) => None,
            _ => anyhow::bail!("--etcd-user and --etcd-password-file go together"),
        };
        Ok(EtcdSecurity {
            ca_pem: self.etcd_ca.as_ref().map(read).transpose()?,
            client_identity,
            user,
        })
    }

    /// `lease_ttl` (default 5 s), checked: etcd takes whole seconds, and a lease shorter than
    /// 2 s would expire between two keep-alives.
    pub fn lease_ttl(&self) -> anyhow::Result<Duration> {
        let ttl = self.lease_ttl.unwrap_or(5);
        anyhow::ensure!(
            (MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl),
            "--lease-ttl must be {MIN_LEASE_TTL} to {MAX_LEASE_TTL} seconds, got {ttl}"
        );
        Ok(Duration::from_secs(ttl))
    }

    /// Connects to etcd with these settings, trying again (every 1 to 10 s) for up to
    /// `wait`: a cluster starting at once has etcd, workers and routers coming up in any
    /// order. Settings that are wrong stay wrong, so they are checked (and their files read)
    /// once, and a user etcd refuses ends it at once.
    pub async fn connect_retrying(&self, wait: Duration) -> anyhow::Result<EtcdRegistry> {
        let ttl = self.lease_ttl()?;
        let endpoints = self.endpoints()?;
        let prefix = self.etcd_prefix.as_deref().unwrap_or("/rwkv");
        let security = self.security()?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_secs(1);
        loop {
            let e = match EtcdRegistry::connect_secured(&endpoints, prefix, ttl, &security).await {
                Ok(registry) => return Ok(registry),
                Err(e) => e,
            };
            let refused = matches!(e, RegistryError::Refused(_));
            let e = anyhow::Error::new(e)
                .context(format!("cannot reach etcd at {}", endpoints.join(",")));
            if refused {
                return Err(e);
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(e.context(format!("gave up after {wait:?}")));
            }
            tracing::warn!("{e:#}; trying again in {pause:?}");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }

    fn endpoints(&self) -> anyhow::Result<Vec<String>> {
        let endpoints: Vec<String> = self
            .etcd
            .as_deref()
            .context("--etcd is required (or RWKV_ETCD, or `etcd` in the config file)")?
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        anyhow::ensure!(!endpoints.is_empty(), "--etcd names no endpoint");
        Ok(endpoints)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_security_settings_come_in_pairs_and_read_their_files() {
        let dir = std::env::temp_dir().join(format!("rwkv-etcd-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (pem, password, empty) = (
            file("x.pem", "pem"),
            file("pw", "secret\nignored\n"),
            file("empty", "\n"),
        );
        let args = |f: &dyn Fn(&mut EtcdArgs)| {
            let mut a = EtcdArgs::default();
            f(&mut a);
            a.security().map_err(|e| e.to_string())
        };
        assert!(args(&|_| {}).unwrap().user.is_none());
        let user = args(&|a| {
            a.etcd_user = Some("rwkv".into());
            a.etcd_password_file = Some(password.clone());
        })
        .unwrap();
        assert_eq!(user.user, Some(("rwkv".into(), "secret".into())));
        type Setting<'a> = &'a dyn Fn(&mut EtcdArgs);
        let cases: [(Setting<'_>, &str); 4] = [
            (
                &|a| a.etcd_user = Some("rwkv".into()),
                "--etcd-password-file",
            ),
            (
                &|a| {
                    a.etcd_user = Some("rwkv".into());
                    a.etcd_password_file = Some(empty.clone());
                },
                "empty",
            ),
            (&|a| a.etcd_cert = Some(pem.clone()), "--etcd-key"),
            (
                &|a| {
                    a.etcd_cert = Some(pem.clone());
                    a.etcd_key = Some(pem.clone());
                },
                "--etcd-ca",
            ),
        ];
        for (set, expected) in cases {
            let err = args(set).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
