//! The JSON Schemas (draft 2020-12) of the command payloads this gateway executes, one per kind,
//! with an example each: `pcg-gateway schemas` prints them, committed as
//! `gateway/agent/command-schemas.json`, which pcg-saas puts into its OpenAPI document.
//!
//! A provider kind's schema is generated (schemars) from the very serde types its parser decodes
//! the payload into (`pcg_provider::command::payload_schema` and its vSphere and OpenStack
//! counterparts, beside each parser), so `deny_unknown_fields`, defaults, tagged and untagged
//! enums read as serde reads them. The built-in `gateway.*` payloads have no type: their schemas
//! are written here, beside [`crate::executor::Registry::builtin`].
//!
//! The document is an object with `kinds` (kind → `{"schema": "#/components/schemas/<kind>",
//! "example"}`) and `components.schemas`: the payload schema of each kind under the kind's own
//! name, and the named types they share (`BmcEndpoint`, `TlsTrust`, `VmSpec`, ...). Every
//! `$ref` is `#/components/schemas/<name>`, so it resolves in this file and, once merged, in the
//! OpenAPI document alike.

use std::path::PathBuf;

use schemars::generate::SchemaSettings;
use schemars::{json_schema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::executor::Registry;

/// Where a payload schema's `$ref`s point.
pub const COMPONENTS: &str = "#/components/schemas/";

fn generator() -> SchemaGenerator {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    settings.into_generator()
}

/// The built-in commands' payloads (no provider, no type: see `Registry::builtin`).
fn builtin_schema(kind: &str) -> Option<Schema> {
    Some(match kind {
        "gateway.diagnose" => json_schema!({
            "type": "object",
            "description": "`gateway.diagnose`: the gateway's identity, version, hostname, uptime, clock, tunnel RTT, journal and outbox depth, certificate expiry and supported kinds. The payload is ignored."
        }),
        "gateway.echo" => json_schema!({
            "type": "object",
            "description": "`gateway.echo`: answers `{\"echo\": payload}`; any object."
        }),
        "gateway.sleep" => json_schema!({
            "type": "object",
            "description": "`gateway.sleep`: waits, then answers `{\"slept_ms\": ms}`. Other keys are ignored.",
            "required": ["ms"],
            "properties": {
                "ms": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": 60000,
                    "description": "How long to wait, in milliseconds."
                }
            }
        }),
        "gateway.ledger" => json_schema!({
            "type": "object",
            "description": "`gateway.ledger` (only on a gateway with `ledger_path` set): appends `<command id> <payload>` to the ledger file and fsyncs it, once per command id; any object."
        }),
        _ => return None,
    })
}

/// The payload schema of `kind`, from the parser that handles it; None for a kind nothing here
/// parses.
pub fn payload_schema(kind: &str, gen: &mut SchemaGenerator) -> Option<Schema> {
    pcg_provider::command::payload_schema(kind, gen)
        .or_else(|| pcg_vsphere::command::payload_schema(kind, gen))
        .or_else(|| pcg_openstack::command::payload_schema(kind, gen))
        .or_else(|| builtin_schema(kind))
}

const PIN: &str = "3f1c4a9be27d5f0c8a6e1b2d4c7f9a0e5b3d6c8f1a2e4b7d9c0f3a5e8b1d2c4f";
const CA_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU...\n-----END CERTIFICATE-----\n";
const SERVER: &str = "5f0e8c1a-3b2d-4e6f-9a7c-1d2e3f4a5b6c";

/// One example payload per kind, as an operator would send it. Each is checked against the
/// kind's parser and schema by the tests below.
pub fn example(kind: &str) -> Option<Value> {
    let cloud = json!({"enrolled": "lab-cloud"});
    Some(match kind {
        "gateway.diagnose" => json!({}),
        "gateway.echo" => json!({"hello": "world"}),
        "gateway.sleep" => json!({"ms": 250}),
        "gateway.ledger" => json!({"n": 1}),
        "baremetal.enrol" => json!({
            "name": "rack1-bmc3",
            "protocol": "redfish",
            "endpoint": {
                "address": "https://bmc3.example.net",
                "user": "admin",
                "password": "change-me",
                "tls": {"pin_sha256": PIN},
                "timeout_ms": 20000
            }
        }),
        "baremetal.power" => json!({"bmc": "rack1-bmc3", "action": "cycle", "timeout_ms": 120000}),
        "baremetal.boot" => json!({
            "bmc": "rack1-bmc3", "device": "pxe", "persistence": "once", "mode": "uefi"
        }),
        "baremetal.insert_media" => json!({
            "bmc": "rack1-bmc3", "image_url": "https://images.example.net/install.iso"
        }),
        "baremetal.eject_media" => json!({"bmc": "rack1-bmc3"}),
        "baremetal.provision" => json!({
            "spec": {
                "name": "node-17",
                "placement": {
                    "provider": "bare_metal",
                    "bmc": "rack1-bmc3",
                    "boot": {"virtual_media": {"image_url": "https://images.example.net/install.iso"}},
                    "boot_mode": "uefi"
                }
            },
            "power_timeout_ms": 120000
        }),
        "baremetal.deprovision" => json!({"bmc": "rack1-bmc3", "system": "1"}),
        "baremetal.get" => json!({"bmc": "rack1-bmc3"}),
        "vsphere.enrol" => json!({
            "name": "lab-vc",
            "endpoint": {
                "url": "https://vcenter.example.net",
                "user": "administrator@vsphere.local",
                "password": "change-me",
                "tls": {"ca_pem": CA_PEM}
            }
        }),
        "vsphere.create" => json!({
            "endpoint": "lab-vc",
            "spec": {
                "name": "web-1",
                "source": "ubuntu-22.04-template",
                "cpus": 2,
                "memory_mib": 4096,
                "networks": ["VM Network"],
                "user_data": "#cloud-config\npackages: [nginx]\n",
                "placement": {"provider": "vsphere", "datacenter": "DC0", "cluster": "DC0_C0"}
            },
            "wait_ip_ms": 300000
        }),
        "vsphere.power" => json!({"endpoint": "lab-vc", "id": "vm-42", "action": "soft_shutdown"}),
        "vsphere.get" | "vsphere.delete" => json!({"endpoint": "lab-vc", "id": "vm-42"}),
        "vsphere.inventory" => json!({
            "endpoint": {
                "url": "https://vcenter.example.net",
                "user": "readonly@vsphere.local",
                "password": "change-me",
                "tls": {"pin_sha256": PIN},
                "timeout_ms": 60000
            }
        }),
        "openstack.enrol" => json!({
            "name": "lab-cloud",
            "cloud": {
                "auth": {
                    "auth_url": "https://keystone.example.net:5000/v3",
                    "username": "pcg",
                    "password": "change-me",
                    "user_domain_name": "Default",
                    "project_name": "demo",
                    "project_domain_name": "Default"
                },
                "region_name": "RegionOne"
            }
        }),
        "openstack.create" => json!({
            "cloud": cloud,
            "server": {
                "name": "web-1",
                "flavor": "m1.small",
                "image": "ubuntu-22.04",
                "networks": ["private"],
                "key_name": "ops",
                "user_data": "#cloud-config\npackages: [nginx]\n",
                "metadata": {"team": "web"}
            },
            "wait": true
        }),
        "openstack.get" | "openstack.delete" => json!({"cloud": cloud, "server": SERVER}),
        "openstack.power" => json!({"cloud": cloud, "server": SERVER, "action": "reset"}),
        "openstack.inventory" => json!({"cloud": "devstack"}),
        _ => return None,
    })
}

/// Every kind a gateway can execute (`gateway.ledger` included, which is registered only with
/// `ledger_path`).
pub fn kinds() -> Vec<String> {
    Registry::standard(Some(PathBuf::from("ledger"))).kinds()
}

/// The document (see the module documentation), or the kinds that lack a schema or an example.
pub fn document_value() -> Result<Value, String> {
    let mut gen = generator();
    let mut kinds = Map::new();
    let mut schemas = Map::new();
    let mut missing = Vec::new();
    for kind in self::kinds() {
        let (Some(schema), Some(example)) = (payload_schema(&kind, &mut gen), example(&kind))
        else {
            missing.push(kind);
            continue;
        };
        let mut schema = schema.to_value();
        if let Some(obj) = schema.as_object_mut() {
            obj.insert("title".into(), Value::String(kind.clone()));
            obj.insert("examples".into(), json!([example]));
        }
        schemas.insert(kind.clone(), schema);
        kinds.insert(
            kind.clone(),
            json!({"schema": format!("{COMPONENTS}{kind}"), "example": example}),
        );
    }
    if !missing.is_empty() {
        return Err(format!(
            "no payload schema or example for {}: add them beside the kind's parser (payload_schema) and in pcg_gateway::schemas::example",
            missing.join(", ")
        ));
    }
    for (name, def) in gen.take_definitions(true) {
        if schemas.contains_key(&name) {
            return Err(format!(
                "the type name {name:?} is also a command kind; rename the type's schema"
            ));
        }
        schemas.insert(name, def);
    }
    Ok(json!({
        "description": "JSON Schemas (draft 2020-12) of the command payloads pcg-gateway executes: `kinds` maps each command kind to its payload schema and an example; `$ref`s point into `components.schemas`. Generated by `pcg-gateway schemas` from the types the gateway parses payloads into; do not edit.",
        "kinds": kinds,
        "components": {"schemas": schemas}
    }))
}

/// The document as pretty-printed JSON with a trailing newline (what `pcg-gateway schemas`
/// prints).
pub fn document() -> Result<String, String> {
    let v = document_value()?;
    let mut s = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = include_str!("../command-schemas.json");

    fn doc() -> Value {
        document_value().expect("every kind has a schema and an example")
    }

    #[test]
    fn committed_schemas_match_the_code() {
        assert!(
            COMMITTED == document().expect("document"),
            "gateway/agent/command-schemas.json is stale: run `cargo run -p pcg-gateway -- schemas > gateway/agent/command-schemas.json`, then `cargo run -p pcg-saas -- openapi > saas-stub/openapi.json`"
        );
    }

    #[test]
    fn every_registered_kind_has_a_schema_and_an_example() {
        let doc = doc();
        let documented: Vec<String> = doc["kinds"]
            .as_object()
            .expect("kinds")
            .keys()
            .cloned()
            .collect();
        let mut registered = kinds();
        registered.sort();
        assert_eq!(documented, registered);
        // Each provider's kinds are registered (so none escapes the check above).
        for kind in pcg_provider::command::KINDS
            .iter()
            .chain(pcg_vsphere::command::KINDS.iter())
            .chain(pcg_openstack::command::KINDS.iter())
        {
            assert!(documented.iter().any(|k| k == kind), "{kind}");
        }
        // A kind nothing parses gets no schema.
        assert!(payload_schema("gateway.nope", &mut generator()).is_none());
    }

    /// The gateway's own parser for `kind`: Ok when it accepts `payload`.
    fn parse(kind: &str, payload: &Value) -> Result<(), String> {
        let p = payload.clone();
        let known = if kind.starts_with("baremetal.") {
            pcg_provider::command::BareMetalCommand::parse_value(kind, p)
                .map(|c| c.is_some())
                .map_err(|e| e.to_string())?
        } else if kind.starts_with("vsphere.") {
            pcg_vsphere::command::VsphereCommand::parse_value(kind, p)
                .map(|c| c.is_some())
                .map_err(|e| e.to_string())?
        } else if kind.starts_with("openstack.") {
            pcg_openstack::command::Command::parse(kind, p)
                .map(|c| c.is_some())
                .map_err(|e| e.to_string())?
        } else {
            panic!("no parser for {kind}")
        };
        assert!(known, "the parser does not know {kind}");
        Ok(())
    }

    /// The document compiled by a JSON Schema validator; one schema per kind.
    struct Validator {
        schemas: boon::Schemas,
        compiler: boon::Compiler,
    }

    const URL: &str = "urn:pcg:command-schemas";

    impl Validator {
        fn new(doc: &Value) -> Self {
            let mut compiler = boon::Compiler::new();
            compiler.set_default_draft(boon::Draft::V2020_12);
            compiler
                .add_resource(URL, doc.clone())
                .expect("the document is a resource");
            Self {
                schemas: boon::Schemas::new(),
                compiler,
            }
        }

        /// Ok when `payload` is valid against the schema of `kind`.
        fn check(&mut self, kind: &str, payload: &Value) -> Result<(), String> {
            let loc = format!("{URL}#/components/schemas/{}", kind.replace('~', "~0"));
            let idx = self
                .compiler
                .compile(&loc, &mut self.schemas)
                .unwrap_or_else(|e| panic!("the schema of {kind} compiles: {e:#}"));
            self.schemas
                .validate(payload, idx)
                .map_err(|e| format!("{e:#}"))
        }
    }

    #[test]
    fn every_example_parses_and_validates() {
        let doc = doc();
        let mut v = Validator::new(&doc);
        for (kind, entry) in doc["kinds"].as_object().expect("kinds") {
            let example = &entry["example"];
            if let Err(e) = v.check(kind, example) {
                panic!("the example of {kind} is invalid against its schema: {e}");
            }
            if kind.starts_with("gateway.") {
                continue; // no typed parser: the handlers read the object themselves
            }
            if let Err(e) = parse(kind, example) {
                panic!("the gateway refuses the example of {kind}: {e}");
            }
        }
    }

    /// Payloads per kind, some the parser accepts and some it refuses: the schema must say the
    /// same of each. A case whose verdicts differ names the payload.
    #[test]
    fn the_schemas_accept_and_refuse_what_the_parsers_do() {
        let doc = doc();
        let mut v = Validator::new(&doc);
        let ep = json!({"address": "https://bmc.example", "user": "u", "password": "p",
            "tls": {"pin_sha256": PIN}});
        let vc = json!({"url": "https://vc.example", "user": "u", "password": "p"});
        let cloud = json!({"auth": {"auth_url": "http://k/v3", "username": "u", "password": "p"}});
        let pxe = json!({"provider": "bare_metal", "bmc": "b", "boot": "pxe"});
        let cases: Vec<(&str, Value)> = vec![
            // baremetal.*: deny_unknown_fields at every level, enums, defaults, null options.
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "ipmi", "endpoint": ep}),
            ),
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "ipmi", "endpoint": ep, "port": 623}),
            ),
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "snmp", "endpoint": ep}),
            ),
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "redfish",
                "endpoint": {"address": "https://b", "user": "u", "password": "p", "tls": {"ca_pem": "X", "pin_sha256": PIN}}}),
            ),
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "redfish",
                "endpoint": {"address": "https://b", "user": "u", "password": "p", "tls": {"pem": "X"}}}),
            ),
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "redfish",
                "endpoint": {"address": "https://b", "user": "u", "password": "p", "verify": false}}),
            ),
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "ipmi",
                "endpoint": {"address": "b", "user": "u", "password": "p", "timeout_ms": null, "tls": null}}),
            ),
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "ipmi",
                "endpoint": {"address": "b", "user": "u", "password": "p", "timeout_ms": -1}}),
            ),
            (
                "baremetal.enrol",
                json!({"name": "b", "protocol": "ipmi", "endpoint": {"address": "b", "user": "u"}}),
            ),
            ("baremetal.power", json!({"bmc": "b", "action": "on"})),
            (
                "baremetal.power",
                json!({"bmc": "b", "action": "status", "wait": false, "system": null}),
            ),
            ("baremetal.power", json!({"bmc": "b", "action": "explode"})),
            (
                "baremetal.power",
                json!({"bmc": "b", "action": "on", "wait": null}),
            ),
            (
                "baremetal.power",
                json!({"bmc": "b", "action": "on", "force": true}),
            ),
            ("baremetal.power", json!({"action": "on"})),
            (
                "baremetal.boot",
                json!({"bmc": "b", "device": "bios_setup", "persistence": "continuous"}),
            ),
            ("baremetal.boot", json!({"bmc": "b", "device": "floppy"})),
            (
                "baremetal.boot",
                json!({"bmc": "b", "device": "pxe", "mode": "efi"}),
            ),
            (
                "baremetal.insert_media",
                json!({"bmc": "b", "image_url": "http://x/i.iso"}),
            ),
            (
                "baremetal.insert_media",
                json!({"bmc": "b", "image_url": "file:///i.iso"}),
            ),
            (
                "baremetal.eject_media",
                json!({"bmc": "b", "image_url": "http://x/i.iso"}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "placement": pxe}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "cpus": 4, "memory_mib": 8192,
                "networks": ["n"], "user_data": "#!", "placement": pxe}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": " ", "placement": pxe}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "size": 4, "placement": pxe}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "placement":
                {"provider": "bare_metal", "bmc": "b", "boot": {"virtual_media": {"image_url": "http://x/i.iso"}}}}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "placement":
                {"provider": "bare_metal", "bmc": "b", "boot": {"virtual_media": {"image_url": "http://x/i.iso", "slot": 1}}}}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "placement":
                {"provider": "bare_metal", "bmc": "b", "boot": {"virtual_media": {"image_url": "nfs://x/i.iso"}}}}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "placement":
                {"provider": "bare_metal", "bmc": "b", "boot": "pxe", "boot_mod": "uefi"}}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "placement":
                {"provider": "vsphere", "bmc": "b", "boot": "pxe"}}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "placement": {"bmc": "b", "boot": "pxe"}}}),
            ),
            (
                "baremetal.provision",
                json!({"spec": {"name": "m", "placement": pxe}, "power_timeout_ms": "1s"}),
            ),
            (
                "baremetal.deprovision",
                json!({"bmc": "b", "power_timeout_ms": 1000}),
            ),
            ("baremetal.get", json!({"bmc": "b", "system": 1})),
            // vsphere.*: the endpoint is a name or an inline object, nothing else.
            ("vsphere.enrol", json!({"name": "lab-vc", "endpoint": vc})),
            ("vsphere.enrol", json!({"name": "a b/c", "endpoint": vc})),
            (
                "vsphere.enrol",
                json!({"name": "lab-vc", "endpoint": "other"}),
            ),
            (
                "vsphere.enrol",
                json!({"name": "lab-vc", "endpoint": {"url": "https://vc", "user": "u", "password": "p", "insecure": true}}),
            ),
            ("vsphere.get", json!({"endpoint": "lab-vc", "id": "vm-1"})),
            ("vsphere.get", json!({"endpoint": vc, "id": "vm-1"})),
            ("vsphere.get", json!({"endpoint": "", "id": "vm-1"})),
            ("vsphere.get", json!({"endpoint": 7, "id": "vm-1"})),
            (
                "vsphere.get",
                json!({"endpoint": "lab-vc", "id": "vm-1", "x": 1}),
            ),
            (
                "vsphere.get",
                json!({"endpoint": {"url": "https://vc", "user": "u"}, "id": "vm-1"}),
            ),
            ("vsphere.delete", json!({"endpoint": "lab-vc"})),
            (
                "vsphere.power",
                json!({"endpoint": "lab-vc", "id": "vm-1", "action": "status"}),
            ),
            (
                "vsphere.power",
                json!({"endpoint": "lab-vc", "id": "vm-1", "action": "reset"}),
            ),
            (
                "vsphere.create",
                json!({"endpoint": "lab-vc", "spec": {"name": "v", "source": "t",
                "placement": {"provider": "vsphere", "cluster": "c"}}}),
            ),
            (
                "vsphere.create",
                json!({"endpoint": "lab-vc", "spec": {"name": "v", "source": "t", "power_on": false,
                "placement": {"provider": "vsphere"}}, "wait_ip_ms": 1000}),
            ),
            (
                "vsphere.create",
                json!({"endpoint": "lab-vc", "spec": {"name": "v", "source": "t", "template": "t",
                "placement": {"provider": "vsphere"}}}),
            ),
            (
                "vsphere.create",
                json!({"endpoint": "lab-vc", "spec": {"name": "v", "source": "t",
                "placement": {"provider": "vsphere", "cluster": "c", "pool": "p"}}}),
            ),
            (
                "vsphere.create",
                json!({"endpoint": "lab-vc", "spec": {"name": "v", "source": "t",
                "placement": {"provider": "aws"}}}),
            ),
            (
                "vsphere.create",
                json!({"endpoint": "lab-vc", "spec": {"name": "v", "source": "t", "cpus": 0,
                    "placement": {"provider": "vsphere"}}}),
            ),
            (
                "vsphere.create",
                json!({"endpoint": "lab-vc", "spec": {"name": "v", "source": " ",
                    "placement": {"provider": "vsphere"}}}),
            ),
            (
                "vsphere.inventory",
                json!({"endpoint": "lab-vc", "page_size": 10}),
            ),
            // openstack.*: a clouds.yaml name, {"enrolled": NAME} alone, or an inline entry.
            ("openstack.enrol", json!({"name": "lab", "cloud": cloud})),
            (
                "openstack.enrol",
                json!({"name": "lab", "cloud": "devstack"}),
            ),
            (
                "openstack.enrol",
                json!({"name": "lab", "cloud": {"enrolled": "other"}}),
            ),
            (
                "openstack.enrol",
                json!({"name": "no/slash", "cloud": cloud}),
            ),
            ("openstack.get", json!({"cloud": "devstack", "server": "s"})),
            (
                "openstack.get",
                json!({"cloud": {"enrolled": "lab"}, "server": "s"}),
            ),
            ("openstack.get", json!({"cloud": cloud, "server": "s"})),
            (
                "openstack.get",
                json!({"cloud": {"enrolled": "lab", "auth": {}}, "server": "s"}),
            ),
            (
                "openstack.get",
                json!({"cloud": {"enrolled": ""}, "server": "s"}),
            ),
            (
                "openstack.get",
                json!({"cloud": {"enrolled": 3}, "server": "s"}),
            ),
            ("openstack.get", json!({"cloud": 7, "server": "s"})),
            (
                "openstack.get",
                json!({"cloud": "devstack", "server": "s", "wait": true}),
            ),
            ("openstack.delete", json!({"cloud": "devstack"})),
            (
                "openstack.power",
                json!({"cloud": "devstack", "server": "s", "action": "soft_shutdown"}),
            ),
            (
                "openstack.power",
                json!({"cloud": "devstack", "server": "s", "action": "hibernate"}),
            ),
            (
                "openstack.create",
                json!({"cloud": "devstack", "server": {"name": "a", "flavor": "f", "image": "i"}}),
            ),
            (
                "openstack.create",
                json!({"cloud": "devstack", "server": {"name": "a", "flavor": "f", "image": "i",
                "auto_network": true, "availability_zone": "nova"}, "wait": false}),
            ),
            (
                "openstack.create",
                json!({"cloud": "devstack", "server": {"name": "a", "flavor": "f", "image": "i",
                "security_groups": ["default"]}}),
            ),
            (
                "openstack.create",
                json!({"cloud": "devstack", "server": {"name": "a", "flavor": "f"}}),
            ),
            (
                "openstack.create",
                json!({"cloud": "devstack", "server": {"name": "a", "flavor": "f", "image": "i",
                "metadata": {"n": 1}}}),
            ),
            (
                "openstack.inventory",
                json!({"cloud": "devstack", "server": "s"}),
            ),
        ];
        let mut disagreements = Vec::new();
        let (mut accepted, mut refused) = (0, 0);
        for (kind, payload) in &cases {
            let parser = parse(kind, payload);
            let schema = v.check(kind, payload);
            match (&parser, &schema) {
                (Ok(()), Ok(())) => accepted += 1,
                (Err(_), Err(_)) => refused += 1,
                _ => disagreements.push(format!(
                    "{kind} {payload}: the parser {} but the schema {}",
                    match &parser {
                        Ok(()) => "accepts it".to_string(),
                        Err(e) => format!("refuses it ({e})"),
                    },
                    match &schema {
                        Ok(()) => "accepts it".to_string(),
                        Err(e) => format!("refuses it ({e})"),
                    }
                )),
            }
        }
        assert!(
            disagreements.is_empty(),
            "{} of {} payloads:\n{}",
            disagreements.len(),
            cases.len(),
            disagreements.join("\n")
        );
        // Both sides of the table are exercised.
        assert!(
            accepted >= 15 && refused >= 30,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn unknown_fields_are_refused_by_schema_where_serde_refuses_them() {
        // One kind per provider: the payload object and its nested objects.
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        for kind in ["baremetal.enrol", "vsphere.enrol", "openstack.create"] {
            assert_eq!(
                schemas[kind]["additionalProperties"],
                Value::Bool(false),
                "{kind}"
            );
        }
        for name in [
            "BmcEndpoint",
            "VsphereEndpoint",
            "ServerSpec",
            "MachineSpec",
            "VmSpec",
        ] {
            assert_eq!(
                schemas[name]["additionalProperties"],
                Value::Bool(false),
                "{name}"
            );
        }
    }
}
