//! Provider endpoints enrolled by name (`vsphere.enrol`, `openstack.enrol`): the endpoint,
//! credentials included, kept sealed in the store's `endpoints` tree and opened when a command
//! names it. Nothing is cached here: a name is resolved from the store on every command, so a
//! restarted gateway knows every name it knew before, and re-enrolling a name takes effect at once.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::executor::ExecError;
use crate::store::{now_ms, EndpointRecord, Store};

/// One provider's enrolled endpoints: its namespace in the store and how messages name it.
#[derive(Debug, Clone, Copy)]
pub struct Enrolled {
    /// `vsphere`, `openstack`.
    pub provider: &'static str,
    /// What one endpoint is called in messages: `vCenter`, `OpenStack cloud`.
    pub what: &'static str,
    /// The command that enrols one.
    pub enrol_kind: &'static str,
}

fn storage(e: crate::store::StoreError) -> ExecError {
    ExecError::new("storage", e.to_string())
}

impl Enrolled {
    /// Stores `endpoint` sealed under `name` (flushed before this returns) and returns the
    /// endpoint enrolled under that name before, if any (None too when it cannot be opened).
    pub async fn put<T: Serialize + DeserializeOwned>(
        &self,
        store: &Store,
        name: &str,
        endpoint: &T,
        info: Value,
    ) -> Result<Option<T>, ExecError> {
        let plain = serde_json::to_vec(endpoint)
            .map_err(|e| ExecError::new("internal", format!("endpoint: {e}")))?;
        let old = store
            .put_endpoint(&EndpointRecord {
                provider: self.provider.into(),
                name: name.into(),
                endpoint_sealed: store.seal(&plain),
                info,
                enrolled_ms: now_ms(),
            })
            .map_err(storage)?;
        store.flush().await.map_err(storage)?;
        Ok(old.and_then(|r| serde_json::from_slice(&store.unseal(&r.endpoint_sealed).ok()?).ok()))
    }

    /// The endpoint enrolled as `name`; `not_found` listing the enrolled names when there is none.
    pub fn get<T: DeserializeOwned>(&self, store: &Store, name: &str) -> Result<T, ExecError> {
        let Some(rec) = store.endpoint(self.provider, name).map_err(storage)? else {
            let names = store.endpoint_names(self.provider);
            return Err(ExecError::new(
                "not_found",
                format!(
                    "no {} is enrolled as {name:?} on this gateway (enrolled: {}); send {} first",
                    self.what,
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    },
                    self.enrol_kind
                ),
            ));
        };
        let unreadable = |detail: String| {
            ExecError::new(
                "storage",
                format!(
                    "the {} enrolled as {name:?} cannot be read ({detail}); send {} again",
                    self.what, self.enrol_kind
                ),
            )
        };
        let plain = store
            .unseal(&rec.endpoint_sealed)
            .map_err(|e| unreadable(e.to_string()))?;
        serde_json::from_slice(&plain).map_err(|e| unreadable(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const E: Enrolled = Enrolled {
        provider: "vsphere",
        what: "vCenter",
        enrol_kind: "vsphere.enrol",
    };

    #[tokio::test]
    async fn enrolled_names_resolve_and_unknown_ones_list_the_known() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let e = E.get::<Value>(&store, "lab").unwrap_err();
        assert_eq!(e.class, "not_found");
        assert!(e.message.contains("enrolled: none"), "{}", e.message);
        let v1 = serde_json::json!({"url": "https://a", "password": "p1"});
        assert!(E
            .put(&store, "lab", &v1, Value::Null)
            .await
            .unwrap()
            .is_none());
        assert_eq!(E.get::<Value>(&store, "lab").unwrap(), v1);
        let v2 = serde_json::json!({"url": "https://a", "password": "p2"});
        assert_eq!(
            E.put(&store, "lab", &v2, Value::Null).await.unwrap(),
            Some(v1)
        );
        let e = E.get::<Value>(&store, "lab2").unwrap_err();
        assert!(e.message.contains("enrolled: lab)"), "{}", e.message);
        assert!(e.message.contains("vsphere.enrol"), "{}", e.message);
    }
}
