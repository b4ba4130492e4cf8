//! The OpenAPI document of the REST API, generated from the handlers' attributes, with the
//! command payload schemas of pcg-gateway merged in.
//!
//! The broker knows no provider, so the payload schemas come as data: pcg-gateway generates
//! them from the types it parses payloads into (`pcg-gateway schemas`, committed as
//! `gateway/agent/command-schemas.json`), and this module includes that file: its schemas become
//! components (each kind's payload under the kind's name, e.g. `baremetal.power`), and the body
//! of `POST /v1/gateways/{id}/commands` becomes one schema per kind (`SubmitCommandRequest.<kind>`,
//! chosen by `kind`) with an example each.

use std::sync::OnceLock;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use super::feed::*;
use super::handlers::*;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "pcg-saas", description = "REST API of the pcg SaaS companion: tenants, API keys, pairing tokens, gateways, commands, events and declared machines."),
    paths(healthz, ca_pem, pair, create_tenant, list_tenants, create_api_key, list_api_keys,
          revoke_api_key, create_token, list_tokens, revoke_token, list_gateways, get_gateway,
          revoke_gateway, submit_command, list_commands, get_command, cancel_command, list_events,
          list_bundles, get_bundle, submit_batch, declare_machine, list_machines, get_machine,
          update_machine, delete_machine, gateway_health, feed_sse),
    components(schemas(super::dto::SubmittedView)),
    modifiers(&SecurityAddon)
)]
struct ApiDoc;

/// The command payload schemas pcg-gateway generates (see the module documentation).
pub const COMMAND_SCHEMAS: &str = include_str!("../../../gateway/agent/command-schemas.json");

/// The path whose request body takes a command.
const SUBMIT_PATH: &str = "/v1/gateways/{id}/commands";

/// The OpenAPI document of this API, pretty-printed JSON with a trailing newline.
pub fn openapi_document() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = crate::VERSION.to_string();
        let mut doc: Json =
            serde_json::from_str(&doc.to_json().expect("the OpenAPI document serialises"))
                .expect("utoipa writes JSON");
        let commands: Json =
            serde_json::from_str(COMMAND_SCHEMAS).expect("command-schemas.json is JSON");
        // The file is compiled in and the tests below merge it: a failure here is a build error.
        merge_command_schemas(&mut doc, commands).expect("the command schemas merge");
        let mut s = serde_json::to_string_pretty(&doc).expect("the OpenAPI document serialises");
        s.push('\n');
        s
    })
    .clone()
}

/// A JSON value whose objects keep their keys in order, so the merge leaves the order of
/// utoipa's output as it was (serde_json's `Value` sorts keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(IndexMap<String, Json>),
}

impl Json {
    fn str(s: impl Into<String>) -> Json {
        Json::String(s.into())
    }

    fn object<const N: usize>(entries: [(&str, Json); N]) -> Json {
        Json::Object(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    fn as_object_mut(&mut self) -> Option<&mut IndexMap<String, Json>> {
        match self {
            Json::Object(m) => Some(m),
            _ => None,
        }
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(m) => m.get(key),
            _ => None,
        }
    }

    /// The object at `path`, created (empty) where missing.
    fn object_at(&mut self, path: &[&str]) -> Result<&mut IndexMap<String, Json>, String> {
        let mut here = self;
        for key in path {
            let m = here
                .as_object_mut()
                .ok_or_else(|| format!("{key}: its parent is not an object"))?;
            here = m
                .entry((*key).to_string())
                .or_insert_with(|| Json::Object(IndexMap::new()));
        }
        here.as_object_mut()
            .ok_or_else(|| format!("{} is not an object", path.join(".")))
    }
}

/// The first sentence of a schema's description (for an example's summary).
fn first_sentence(schema: &Json) -> Option<String> {
    let Json::String(d) = schema.get("description")? else {
        return None;
    };
    let end = d.find(". ").or_else(|| d.find(".\n")).unwrap_or(d.len());
    Some(d[..end].trim_end_matches('.').replace('\n', " "))
}

/// Puts the command schemas into `doc`: every schema of the file as a component, one
/// `SubmitCommandRequest.<kind>` per kind, `SubmitCommandRequest` as the choice among them by
/// `kind`, and an example per kind on the submit request body.
fn merge_command_schemas(doc: &mut Json, commands: Json) -> Result<(), String> {
    let Some(Json::Object(kinds)) = commands.get("kinds").cloned() else {
        return Err("command-schemas.json has no `kinds` object".into());
    };
    let Some(Json::Object(schemas)) = commands
        .get("components")
        .and_then(|c| c.get("schemas"))
        .cloned()
    else {
        return Err("command-schemas.json has no `components.schemas` object".into());
    };
    let components = doc.object_at(&["components", "schemas"])?;
    for (name, schema) in schemas {
        if components.contains_key(&name) {
            return Err(format!(
                "the command schema {name:?} has the name of a REST API schema"
            ));
        }
        components.insert(name, schema);
    }
    let mut choices = Vec::new();
    let mut mapping = IndexMap::new();
    let mut examples = IndexMap::new();
    for (kind, entry) in kinds {
        let payload_ref = format!("#/components/schemas/{kind}");
        let payload = components
            .get(&kind)
            .ok_or_else(|| format!("no schema for {kind}"))?;
        let summary = first_sentence(payload).unwrap_or_else(|| kind.clone());
        // `payload` may be left out (it defaults to `{}`) only where `{}` is a valid payload.
        let needs_payload =
            matches!(payload.get("required"), Some(Json::Array(r)) if !r.is_empty());
        let mut required = vec![Json::str("kind")];
        if needs_payload {
            required.push(Json::str("payload"));
        }
        let name = format!("SubmitCommandRequest.{kind}");
        components.insert(
            name.clone(),
            Json::object([
                ("type", Json::str("object")),
                ("title", Json::str(kind.clone())),
                ("required", Json::Array(required)),
                (
                    "properties",
                    Json::object([
                        (
                            "kind",
                            Json::object([
                                ("type", Json::str("string")),
                                ("const", Json::str(kind.clone())),
                            ]),
                        ),
                        ("payload", Json::object([("$ref", Json::str(payload_ref))])),
                    ]),
                ),
            ]),
        );
        let submit_ref = format!("#/components/schemas/{name}");
        choices.push(Json::object([("$ref", Json::str(submit_ref.clone()))]));
        mapping.insert(kind.clone(), Json::str(submit_ref));
        let example = entry
            .get("example")
            .cloned()
            .ok_or_else(|| format!("no example for {kind}"))?;
        examples.insert(
            kind.clone(),
            Json::object([
                ("summary", Json::str(summary)),
                (
                    "value",
                    Json::object([("kind", Json::str(kind.clone())), ("payload", example)]),
                ),
            ]),
        );
    }
    components.insert(
        "SubmitCommandRequest".into(),
        Json::object([
            (
                "description",
                Json::str(
                    "A command: its `kind` (`<namespace>.<verb>`) and the `payload` that kind takes (a JSON object; `{}` when left out). One schema per kind that pcg-gateway of this version executes, chosen by `kind`; each payload schema is the component named after its kind (e.g. `baremetal.power`). The SaaS itself checks that `kind` is well-formed and, once the gateway has connected, that the gateway announced it; the gateway checks the payload and answers `invalid_spec` (or `invalid_payload`) naming what is wrong.",
                ),
            ),
            ("oneOf", Json::Array(choices)),
            (
                "discriminator",
                Json::object([
                    ("propertyName", Json::str("kind")),
                    ("mapping", Json::Object(mapping)),
                ]),
            ),
        ]),
    );
    components.sort_keys();
    let media = doc.object_at(&[
        "paths",
        SUBMIT_PATH,
        "post",
        "requestBody",
        "content",
        "application/json",
    ])?;
    media.insert("examples".into(), Json::Object(examples));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::from_str(&openapi_document()).expect("the document is JSON")
    }

    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_ref_resolves() {
        let doc = doc();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 100, "{} refs", all.len());
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r} points outside the components"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} does not resolve"
            );
        }
    }

    #[test]
    fn the_submit_body_is_one_schema_per_kind_with_an_example_each() {
        let doc = doc();
        let commands: Value = serde_json::from_str(COMMAND_SCHEMAS).expect("JSON");
        let kinds = commands["kinds"].as_object().expect("kinds");
        assert!(kinds.len() >= 20, "{} kinds", kinds.len());
        let schemas = &doc["components"]["schemas"];
        // Every command schema is a component, unchanged.
        for (name, schema) in commands["components"]["schemas"]
            .as_object()
            .expect("schemas")
        {
            assert_eq!(&schemas[name], schema, "{name}");
        }
        let submit = &schemas["SubmitCommandRequest"];
        let one_of = submit["oneOf"].as_array().expect("oneOf");
        assert_eq!(one_of.len(), kinds.len());
        let body = &doc["paths"][SUBMIT_PATH]["post"]["requestBody"]["content"]["application/json"];
        assert_eq!(
            body["schema"]["$ref"],
            "#/components/schemas/SubmitCommandRequest"
        );
        for (kind, entry) in kinds {
            let name = format!("SubmitCommandRequest.{kind}");
            let r = format!("#/components/schemas/{name}");
            assert!(one_of.iter().any(|c| c["$ref"] == r.as_str()), "{kind}");
            assert_eq!(submit["discriminator"]["mapping"][kind], r.as_str());
            assert_eq!(schemas[&name]["properties"]["kind"]["const"], kind.as_str());
            assert_eq!(
                schemas[&name]["properties"]["payload"]["$ref"],
                format!("#/components/schemas/{kind}").as_str()
            );
            let example = &body["examples"][kind]["value"];
            assert_eq!(example["kind"], kind.as_str());
            assert_eq!(example["payload"], entry["example"], "{kind}");
            assert!(body["examples"][kind]["summary"].is_string(), "{kind}");
        }
        // `payload` is required exactly where `{}` would not do.
        assert_eq!(
            schemas["SubmitCommandRequest.baremetal.power"]["required"],
            serde_json::json!(["kind", "payload"])
        );
        assert_eq!(
            schemas["SubmitCommandRequest.gateway.diagnose"]["required"],
            serde_json::json!(["kind"])
        );
    }

    #[test]
    fn a_name_taken_by_the_rest_api_is_refused() {
        let mut doc: Json =
            serde_json::from_str(r#"{"components": {"schemas": {"ErrorBody": {}}}, "paths": {}}"#)
                .expect("JSON");
        let commands: Json = serde_json::from_str(
            r#"{"kinds": {}, "components": {"schemas": {"ErrorBody": {"type": "object"}}}}"#,
        )
        .expect("JSON");
        let e = merge_command_schemas(&mut doc, commands).expect_err("collision");
        assert!(e.contains("ErrorBody"), "{e}");
    }

    #[test]
    fn the_merge_keeps_the_order_of_the_rest() {
        let plain = ApiDoc::openapi().to_pretty_json().expect("serialises");
        let merged = openapi_document();
        // The operations come out as utoipa wrote them: `tags` before `operationId`, etc.
        let first_op = |s: &str| {
            let i = s.find("\"/healthz\"").expect("healthz");
            s[i..].chars().take(200).collect::<String>()
        };
        assert_eq!(first_op(&plain), first_op(&merged));
    }
}
