//! [`VmProvider`] for OpenStack: one project, one osauth session. Create is idempotent by command
//! id through Nova metadata ([`crate::COMMAND_ID_KEY`]) and returns once the server is ACTIVE
//! (and SHUTOFF again when `power_on` is false).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use pcg_provider::vm::{Inventory, InventoryObject, VmInfo, VmPlacement, VmProvider, VmSpec};
use pcg_provider::{PowerAction, ProgressSink, ProviderError, Result, TaskProgress};

use crate::client::{OpenStack, Server, ServerSpec, DEFAULT_WAIT};

impl OpenStack {
    /// The [`ServerSpec`] of a generic [`VmSpec`] (flavor by name/id, or the smallest that fits
    /// `cpus`/`memory_mib`).
    pub async fn server_spec(&self, spec: &VmSpec) -> Result<ServerSpec> {
        spec.validate()?;
        if spec.metadata.is_some() {
            return Err(ProviderError::invalid(
                "metadata",
                "cloud-init meta-data cannot be set on OpenStack: Nova's metadata service provides it",
            ));
        }
        let (flavor, availability_zone) = match &spec.placement {
            VmPlacement::Openstack {
                flavor,
                availability_zone,
            } => (flavor.clone(), availability_zone.clone()),
            other => {
                return Err(ProviderError::invalid(
                    "placement",
                    format!("{other:?} is not an OpenStack placement"),
                ))
            }
        };
        let flavor = match flavor {
            Some(f) => f,
            None => self.flavor_for(spec.cpus, spec.memory_mib).await?.id,
        };
        Ok(ServerSpec {
            name: spec.name.clone(),
            flavor,
            image: spec.source.clone(),
            networks: spec.networks.clone(),
            user_data: spec.user_data.clone(),
            availability_zone,
            ..ServerSpec::default()
        })
    }
}

/// A server as the provider contract's [`VmInfo`].
pub fn vm_info(s: &Server) -> VmInfo {
    let mut details = BTreeMap::new();
    details.insert("status".to_string(), s.status.clone());
    if let Some(f) = &s.flavor_id {
        details.insert("flavor_id".into(), f.clone());
    }
    if let Some(i) = &s.image_id {
        details.insert("image_id".into(), i.clone());
    }
    if let Some(f) = &s.fault {
        details.insert("fault".into(), f.clone());
    }
    VmInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        power: s.power(),
        cpus: None,
        memory_mib: None,
        ip: s.ip.clone(),
        template: false,
        command_id: s.command_id().map(str::to_string),
        details,
    }
}

#[async_trait]
impl VmProvider for OpenStack {
    fn endpoint(&self) -> &str {
        OpenStack::endpoint(self)
    }

    async fn create(
        &self,
        command_id: &str,
        spec: &VmSpec,
        progress: ProgressSink<'_>,
    ) -> Result<VmInfo> {
        let ss = self.server_spec(spec).await?;
        progress(&TaskProgress::running(10, "creating server"));
        let s = OpenStack::create(self, Some(command_id), &ss).await?;
        progress(&TaskProgress::running(
            40,
            format!("server {} is {}", s.id, s.status),
        ));
        let s = if s.status == "SHUTOFF" && spec.power_on {
            self.power(&s.id, PowerAction::On, DEFAULT_WAIT).await?
        } else if s.status == "SHUTOFF" {
            s
        } else {
            self.wait_status(&s.id, "ACTIVE", DEFAULT_WAIT).await?
        };
        let s = if spec.power_on {
            s
        } else {
            OpenStack::power(self, &s.id, PowerAction::Off, DEFAULT_WAIT).await?
        };
        progress(&TaskProgress::running(
            100,
            format!("server {} is {}", s.id, s.status),
        ));
        Ok(vm_info(&s))
    }

    async fn find_by_command(&self, command_id: &str) -> Result<Option<VmInfo>> {
        Ok(OpenStack::find_by_command(self, None, command_id)
            .await?
            .map(|s| vm_info(&s)))
    }

    async fn get(&self, id: &str) -> Result<VmInfo> {
        Ok(vm_info(&OpenStack::get(self, id).await?))
    }

    async fn list(&self) -> Result<Vec<VmInfo>> {
        Ok(OpenStack::list(self).await?.iter().map(vm_info).collect())
    }

    async fn inventory(&self) -> Result<Inventory> {
        let mut objects = Vec::new();
        for f in self.flavors().await? {
            objects.push(InventoryObject {
                kind: "Flavor".into(),
                id: f.id,
                name: f.name,
                parent: None,
            });
        }
        for i in self.images().await? {
            objects.push(InventoryObject {
                kind: "Image".into(),
                id: i.id,
                name: i.name,
                parent: None,
            });
        }
        for n in self.networks().await? {
            objects.push(InventoryObject {
                kind: "Network".into(),
                id: n.id,
                name: n.name,
                parent: None,
            });
        }
        let vms = OpenStack::list(self).await?.iter().map(vm_info).collect();
        Ok(Inventory { objects, vms })
    }

    async fn power(&self, id: &str, action: PowerAction) -> Result<()> {
        OpenStack::power(self, id, action, DEFAULT_WAIT)
            .await
            .map(|_| ())
    }

    async fn delete(&self, id: &str, progress: ProgressSink<'_>) -> Result<bool> {
        progress(&TaskProgress::running(10, format!("deleting server {id}")));
        OpenStack::delete(self, id, DEFAULT_WAIT).await
    }

    async fn wait_ip(&self, id: &str, bound: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + bound;
        loop {
            let s = OpenStack::get(self, id).await?;
            if let Some(ip) = s.ip {
                return Ok(ip);
            }
            if std::time::Instant::now() >= deadline {
                return Err(ProviderError::Timeout {
                    component: pcg_provider::Component::OpenStack,
                    endpoint: OpenStack::endpoint(self).to_string(),
                    operation: format!("waiting for an IP address of server {id}"),
                    after: bound,
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn close(&self) -> Result<()> {
        // Keystone tokens expire on their own; osauth has no revocation call.
        Ok(())
    }
}
