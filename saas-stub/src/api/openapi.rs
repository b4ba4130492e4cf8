//! The OpenAPI document of the REST API, generated from the handlers' attributes.

use utoipa::OpenApi;

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
          revoke_gateway, submit_command, list_commands, get_command, list_events,
          list_bundles, get_bundle, submit_batch, declare_machine, list_machines, get_machine,
          update_machine, delete_machine, gateway_health),
    modifiers(&SecurityAddon)
)]
struct ApiDoc;

/// The OpenAPI document of this API, pretty-printed JSON with a trailing newline.
pub fn openapi_document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = crate::VERSION.to_string();
    let mut s = doc
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    s.push('\n');
    s
}
