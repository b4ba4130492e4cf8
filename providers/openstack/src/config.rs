//! Where an OpenStack cloud is and how to log in: a `clouds.yaml` entry (inline, or by name from
//! the files openstackclient reads), or the `OS_*` environment variables.
//!
//! Every source is turned into one clouds.yaml-shaped entry and handed to osauth's
//! `CloudConfig`, so all of them behave the same. osauth 0.5 itself looks for clouds.yaml only in
//! the current directory, `~/.config/openstack` and `/etc/openstack`; openstackclient also honours
//! `OS_CLIENT_CONFIG_FILE` and lets `OS_*` variables override a named cloud, which is done here.
//!
//! Supported: `auth_type` `password` (user and user domain by name; project by name or id, its
//! domain by name or id) and `v3applicationcredential` (by id, or by name with `user_id`);
//! `region_name`, `interface`, `cacert`. Not supported by osauth 0.5: users and user domains by
//! id for password auth.

use std::path::{Path, PathBuf};

use pcg_provider::ProviderError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Which cloud to use: the `cloud` of an `openstack.*` payload.
///
/// - a string: a cloud named in clouds.yaml on the gateway host;
/// - `{"enrolled": "NAME"}` (that one key only): a cloud enrolled with `openstack.enrol`, whose
///   entry the gateway keeps (clouds.yaml entries have no `enrolled` key, so the two cannot be
///   confused);
/// - any other object: a clouds.yaml cloud entry given inline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CloudRef {
    /// A cloud named in clouds.yaml on the gateway host (found as openstackclient finds it).
    Named(String),
    /// A cloud enrolled on the gateway with `openstack.enrol`.
    Enrolled { enrolled: String },
    /// A clouds.yaml cloud entry given inline: `{"auth": {...}, "auth_type": ..., "region_name": ...}`.
    Inline(Value),
}

impl<'de> Deserialize<'de> for CloudRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        match Value::deserialize(d)? {
            Value::String(name) if !name.trim().is_empty() => Ok(Self::Named(name)),
            Value::Object(m) if m.contains_key("enrolled") => {
                match (m.len(), m.get("enrolled")) {
                    (1, Some(Value::String(name))) if !name.trim().is_empty() => {
                        Ok(Self::Enrolled {
                            enrolled: name.clone(),
                        })
                    }
                    _ => Err(D::Error::custom(
                        "cloud: {\"enrolled\": NAME} names a cloud enrolled with openstack.enrol and takes no other key",
                    )),
                }
            }
            v @ Value::Object(_) => Ok(Self::Inline(v)),
            _ => Err(D::Error::custom(
                "cloud must be a clouds.yaml cloud name (a string), {\"enrolled\": NAME} (see openstack.enrol) or an inline clouds.yaml entry (an object)",
            )),
        }
    }
}

/// JSON Schemas of a payload's `cloud` (what [`CloudRef`]'s `Deserialize` accepts).
#[cfg(feature = "schema")]
mod schema {
    use std::borrow::Cow;

    use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

    use super::CloudRef;

    /// An inline clouds.yaml entry, as a named schema: the keys pcg reads. osauth reads every
    /// value as a string and takes keys it does not know as options, so unknown keys are
    /// allowed; an `enrolled` key would make it an enrolled reference.
    pub struct InlineCloud;

    impl JsonSchema for InlineCloud {
        fn schema_name() -> Cow<'static, str> {
            "OpenstackCloudEntry".into()
        }

        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            let text =
                |description: &str| json_schema!({"type": "string", "description": description});
            let secret = |description: &str| json_schema!({"type": "string", "writeOnly": true, "description": description});
            json_schema!({
                "type": "object",
                "description": "A clouds.yaml cloud entry given inline: password auth (`auth.username`, `auth.password`, a project) or an application credential (`auth.application_credential_id`, or `_name` with `auth.user_id`, and `auth.application_credential_secret`). Secrets are sealed to the gateway by the SaaS.",
                "required": ["auth"],
                "not": {"required": ["enrolled"]},
                "properties": {
                    "auth": {
                        "type": "object",
                        "required": ["auth_url"],
                        "properties": {
                            "auth_url": text("Keystone v3 URL, e.g. `https://keystone.example:5000/v3`."),
                            "username": text("User name (password auth)."),
                            "password": secret("Password (password auth)."),
                            "user_domain_name": text("The user's domain (default `Default`)."),
                            "user_id": text("User id (with `application_credential_name`)."),
                            "project_name": text("Project to scope the token to, by name."),
                            "project_id": text("Project to scope the token to, by id."),
                            "project_domain_name": text("The project's domain by name (default `Default`)."),
                            "project_domain_id": text("The project's domain by id."),
                            "application_credential_id": text("Application credential id."),
                            "application_credential_name": text("Application credential name (with `user_id`)."),
                            "application_credential_secret": secret("Application credential secret.")
                        }
                    },
                    "auth_type": text("`password` or `v3applicationcredential` (default: `v3applicationcredential` when `auth.application_credential_secret` is given, else `password`)."),
                    "region_name": text("Region."),
                    "interface": text("Endpoint interface: `public` (default), `internal` or `admin`."),
                    "cacert": text("PEM file of the CA that signs Keystone's and Nova's certificates, on the gateway host."),
                    "timeout_ms": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "Bound on each request to the cloud, in milliseconds (default 30000)."
                    }
                }
            })
        }
    }

    /// The schema of `openstack.enrol`'s `cloud`: an inline entry only.
    pub fn inline_cloud_schema(gen: &mut SchemaGenerator) -> Schema {
        gen.subschema_for::<InlineCloud>()
    }

    impl JsonSchema for CloudRef {
        fn schema_name() -> Cow<'static, str> {
            "OpenstackCloudRef".into()
        }

        fn json_schema(gen: &mut SchemaGenerator) -> Schema {
            let inline = gen.subschema_for::<InlineCloud>();
            json_schema!({
                "description": "The cloud: a clouds.yaml cloud name on the gateway host, a cloud enrolled with `openstack.enrol`, or a clouds.yaml entry inline.",
                "oneOf": [
                    {
                        "type": "string",
                        "pattern": "\\S",
                        "description": "A cloud named in clouds.yaml on the gateway host (found as openstackclient finds it, `OS_CLIENT_CONFIG_FILE` included)."
                    },
                    {
                        "type": "object",
                        "required": ["enrolled"],
                        "properties": {"enrolled": {"type": "string", "pattern": "\\S"}},
                        "additionalProperties": false,
                        "description": "A cloud enrolled with `openstack.enrol`, by name."
                    },
                    inline
                ]
            })
        }
    }
}

#[cfg(feature = "schema")]
pub use schema::inline_cloud_schema;

/// A resolved cloud entry in clouds.yaml shape, plus what messages need.
#[derive(Clone)]
pub struct CloudEntry {
    pub(crate) entry: Value,
    /// Where the entry came from (a file and cloud name, "inline", "environment").
    pub source: String,
}

impl std::fmt::Debug for CloudEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudEntry")
            .field("source", &self.source)
            .field("auth_url", &self.auth_url())
            .field("user", &self.user())
            .finish_non_exhaustive()
    }
}

fn invalid(detail: impl Into<String>) -> ProviderError {
    ProviderError::invalid("cloud", detail)
}

impl CloudEntry {
    /// An inline clouds.yaml entry.
    pub fn inline(entry: Value) -> Result<Self, ProviderError> {
        if !entry.is_object() {
            return Err(invalid("must be a clouds.yaml cloud entry (an object)"));
        }
        Ok(Self {
            entry,
            source: "inline cloud entry".into(),
        })
    }

    /// The clouds.yaml entry `name` from the first file openstackclient would read
    /// (`OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`, `~/.config/openstack/clouds.yaml`,
    /// `/etc/openstack/clouds.yaml`).
    pub fn named(name: &str) -> Result<Self, ProviderError> {
        let files = clouds_yaml_candidates();
        let Some(file) = files.iter().find(|p| p.is_file()) else {
            return Err(invalid(format!(
                "cloud {name:?}: no clouds.yaml found (looked at {})",
                files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        Self::from_file(file, name)
    }

    /// The entry `name` of the clouds.yaml file `file`.
    pub fn from_file(file: &Path, name: &str) -> Result<Self, ProviderError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| invalid(format!("cannot read {}: {e}", file.display())))?;
        let doc: Value = serde_yaml::from_str(&text)
            .map_err(|e| invalid(format!("{} is not valid YAML: {e}", file.display())))?;
        let clouds = doc
            .get("clouds")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid(format!("{} has no `clouds` mapping", file.display())))?;
        let entry = clouds.get(name).cloned().ok_or_else(|| {
            invalid(format!(
                "{} has no cloud {name:?} (it has: {})",
                file.display(),
                clouds.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        Ok(Self {
            entry,
            source: format!("cloud {name:?} of {}", file.display()),
        })
    }

    /// The `OS_*` environment as openstackclient reads it: `OS_CLOUD` names a clouds.yaml entry,
    /// and the other `OS_*` variables set (or override) its fields.
    pub fn from_env() -> Result<Self, ProviderError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`CloudEntry::from_env`], with the variables read through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, ProviderError> {
        let mut me = match get("OS_CLOUD") {
            Some(name) => match get("OS_CLIENT_CONFIG_FILE") {
                Some(f) => Self::from_file(Path::new(&f), &name)?,
                None => Self::named(&name)?,
            },
            None => Self {
                entry: Value::Object(Map::new()),
                source: "OS_* environment".into(),
            },
        };
        const AUTH: [(&str, &str); 14] = [
            ("OS_AUTH_URL", "auth_url"),
            ("OS_USERNAME", "username"),
            ("OS_USER_ID", "user_id"),
            ("OS_PASSWORD", "password"),
            ("OS_USER_DOMAIN_NAME", "user_domain_name"),
            ("OS_USER_DOMAIN_ID", "user_domain_id"),
            ("OS_PROJECT_NAME", "project_name"),
            ("OS_PROJECT_ID", "project_id"),
            ("OS_PROJECT_DOMAIN_NAME", "project_domain_name"),
            ("OS_PROJECT_DOMAIN_ID", "project_domain_id"),
            ("OS_APPLICATION_CREDENTIAL_ID", "application_credential_id"),
            (
                "OS_APPLICATION_CREDENTIAL_NAME",
                "application_credential_name",
            ),
            (
                "OS_APPLICATION_CREDENTIAL_SECRET",
                "application_credential_secret",
            ),
            ("OS_TOKEN", "token"),
        ];
        const TOP: [(&str, &str); 4] = [
            ("OS_AUTH_TYPE", "auth_type"),
            ("OS_REGION_NAME", "region_name"),
            ("OS_INTERFACE", "interface"),
            ("OS_CACERT", "cacert"),
        ];
        let obj = me
            .entry
            .as_object_mut()
            .ok_or_else(|| invalid("the cloud entry is not a mapping"))?;
        for (var, key) in TOP {
            if let Some(v) = get(var) {
                obj.insert(key.into(), Value::String(v));
            }
        }
        let auth = obj
            .entry("auth")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(auth) = auth.as_object_mut() {
            for (var, key) in AUTH {
                if let Some(v) = get(var) {
                    auth.insert(key.into(), Value::String(v));
                }
            }
        }
        if me
            .entry
            .pointer("/auth/auth_url")
            .and_then(Value::as_str)
            .is_none()
        {
            return Err(invalid(format!(
                "{}: no auth URL (set OS_AUTH_URL or OS_CLOUD)",
                me.source
            )));
        }
        Ok(me)
    }

    /// Resolves a [`CloudRef`]. Enrolled clouds are the gateway's to resolve (it keeps their
    /// entries), so they are refused here.
    pub fn resolve(r: &CloudRef) -> Result<Self, ProviderError> {
        match r {
            CloudRef::Named(n) => Self::named(n),
            CloudRef::Inline(v) => Self::inline(v.clone()),
            CloudRef::Enrolled { enrolled } => Err(invalid(format!(
                "{enrolled:?} names an enrolled cloud; only the gateway resolves enrolled names"
            ))),
        }
    }

    /// The entry as clouds.yaml shapes it (secrets included: seal it before storing it).
    pub fn entry(&self) -> &Value {
        &self.entry
    }

    /// A key naming this entry for session caches: the auth URL, the user, and a digest of the
    /// whole entry, so changed credentials get a new session.
    pub fn session_key(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(self.entry.to_string().as_bytes());
        format!(
            "{}|{}|{}",
            self.auth_url(),
            self.user(),
            hex::encode(digest)
        )
    }

    fn auth_str(&self, key: &str) -> Option<&str> {
        self.entry.get("auth")?.get(key)?.as_str()
    }

    /// The Keystone URL (empty when the entry has none).
    pub fn auth_url(&self) -> &str {
        self.auth_str("auth_url").unwrap_or("")
    }

    /// Who logs in: the user name or id, or the application credential's id or name.
    pub fn user(&self) -> String {
        if self.is_application_credential() {
            let id = self
                .auth_str("application_credential_id")
                .or_else(|| self.auth_str("application_credential_name"))
                .unwrap_or("?");
            return format!("application credential {id}");
        }
        self.auth_str("username")
            .or_else(|| self.auth_str("user_id"))
            .unwrap_or("")
            .to_string()
    }

    fn is_application_credential(&self) -> bool {
        self.entry.get("auth_type").and_then(Value::as_str) == Some("v3applicationcredential")
            || (self.entry.get("auth_type").is_none()
                && self.auth_str("application_credential_secret").is_some())
    }

    /// The region, when one is set.
    pub fn region(&self) -> Option<&str> {
        self.entry.get("region_name").and_then(Value::as_str)
    }

    /// The entry as osauth's `CloudConfig`.
    pub(crate) fn to_osauth(&self) -> Result<osauth::CloudConfig, ProviderError> {
        let mut entry = self.entry.clone();
        if let Some(obj) = entry.as_object_mut() {
            if self.is_application_credential() {
                obj.insert("auth_type".into(), "v3applicationcredential".into());
            }
            // Keys osauth does not know (e.g. identity_api_version) land in its free-form options.
        }
        serde_json::from_value(entry).map_err(|e| invalid(format!("{}: {e}", self.source)))
    }
}

/// The clouds.yaml files openstackclient reads, in order.
pub fn clouds_yaml_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(f) = std::env::var("OS_CLIENT_CONFIG_FILE") {
        v.push(PathBuf::from(f));
    }
    v.push(PathBuf::from("clouds.yaml"));
    if let Ok(h) = std::env::var("HOME") {
        v.push(Path::new(&h).join(".config/openstack/clouds.yaml"));
    }
    v.push(PathBuf::from("/etc/openstack/clouds.yaml"));
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn env_overrides_a_named_cloud_and_secrets_stay_out_of_debug() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("clouds.yaml");
        std::fs::write(
            &f,
            "clouds:\n  c1:\n    auth:\n      auth_url: http://127.0.0.1:5000/v3\n      username: u\n      password: s3cret\n      project_name: p\n    region_name: R1\n",
        )
        .unwrap();
        let fs = f.display().to_string();
        let e = CloudEntry::from_vars(|k| match k {
            "OS_CLOUD" => Some("c1".into()),
            "OS_CLIENT_CONFIG_FILE" => Some(fs.clone()),
            "OS_REGION_NAME" => Some("R2".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(e.auth_url(), "http://127.0.0.1:5000/v3");
        assert_eq!(e.user(), "u");
        assert_eq!(e.region(), Some("R2"));
        assert!(!format!("{e:?}").contains("s3cret"));
        e.to_osauth().unwrap();
        let missing = CloudEntry::from_file(&f, "c9").unwrap_err().to_string();
        assert!(missing.contains("c1"), "{missing}");
    }

    #[test]
    fn application_credentials_are_recognised() {
        let e = CloudEntry::inline(serde_json::json!({"auth": {
            "auth_url": "http://k/v3", "application_credential_id": "abc",
            "application_credential_secret": "x"}}))
        .unwrap();
        assert_eq!(e.user(), "application credential abc");
        e.to_osauth().unwrap();
    }
}
