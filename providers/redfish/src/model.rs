//! Serde models of the Redfish resources pcg reads. Lenient: every field is optional, unknown
//! fields (including `Oem`) are kept as JSON values or ignored, so vendor variations parse.

use serde::Deserialize;
use serde_json::Value;

/// `{"@odata.id": "..."}`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Link {
    #[serde(rename = "@odata.id", default)]
    pub odata_id: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRoot {
    #[serde(default)]
    pub redfish_version: Option<String>,
    #[serde(default)]
    pub systems: Option<Link>,
    #[serde(default)]
    pub managers: Option<Link>,
    #[serde(default)]
    pub session_service: Option<Link>,
    #[serde(default)]
    pub links: Option<RootLinks>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RootLinks {
    #[serde(default)]
    pub sessions: Option<Link>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Collection {
    #[serde(rename = "Members", default)]
    pub members: Vec<Link>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct System {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub manufacturer: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub power_state: Option<String>,
    #[serde(default)]
    pub boot: Option<Boot>,
    #[serde(default)]
    pub virtual_media: Option<Link>,
    #[serde(default)]
    pub actions: Option<SystemActions>,
    #[serde(default)]
    pub links: Option<SystemLinks>,
    #[serde(default)]
    pub oem: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SystemLinks {
    #[serde(default)]
    pub managed_by: Vec<Link>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SystemActions {
    #[serde(rename = "#ComputerSystem.Reset", default)]
    pub reset: Option<ResetAction>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResetAction {
    #[serde(default)]
    pub target: String,
    #[serde(rename = "ResetType@Redfish.AllowableValues", default)]
    pub allowable: Vec<String>,
    #[serde(rename = "@Redfish.ActionInfo", default)]
    pub action_info: Option<String>,
}

/// An ActionInfo resource: the parameters of an action and their allowable values.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActionInfo {
    #[serde(default)]
    pub parameters: Vec<ActionParameter>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActionParameter {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub allowable_values: Vec<String>,
}

impl ActionInfo {
    /// The allowable values of parameter `name` (empty when not stated).
    pub fn allowable(&self, name: &str) -> Vec<String> {
        self.parameters
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.allowable_values.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Boot {
    #[serde(rename = "BootSourceOverrideEnabled", default)]
    pub enabled: Option<String>,
    #[serde(rename = "BootSourceOverrideTarget", default)]
    pub target: Option<String>,
    #[serde(rename = "BootSourceOverrideTarget@Redfish.AllowableValues", default)]
    pub allowable_targets: Vec<String>,
    #[serde(rename = "BootSourceOverrideMode", default)]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Manager {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub virtual_media: Option<Link>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualMedia {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub media_types: Vec<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub inserted: Option<bool>,
    #[serde(default)]
    pub actions: Option<MediaActions>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct MediaActions {
    #[serde(rename = "#VirtualMedia.InsertMedia", default)]
    pub insert: Option<ActionTarget>,
    #[serde(rename = "#VirtualMedia.EjectMedia", default)]
    pub eject: Option<ActionTarget>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ActionTarget {
    #[serde(default)]
    pub target: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Task {
    #[serde(default)]
    pub task_state: Option<String>,
    #[serde(default)]
    pub percent_complete: Option<u8>,
    #[serde(default)]
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Message {
    #[serde(default)]
    pub message: Option<String>,
}

/// The service's own words from an error body (`error.message` and extended info), or the body
/// text when it is not a Redfish error object.
pub fn error_message(body: &Value) -> String {
    if let Some(s) = body.as_str() {
        return s.trim().chars().take(500).collect();
    }
    let err = &body["error"];
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = err["message"].as_str() {
        parts.push(m.to_owned());
    }
    if let Some(infos) = err["@Message.ExtendedInfo"].as_array() {
        for i in infos {
            if let Some(m) = i["Message"].as_str() {
                parts.push(m.to_owned());
            }
        }
    }
    if parts.is_empty() {
        let s = body.to_string();
        return s.chars().take(500).collect();
    }
    parts.join("; ")
}

/// Parses a typed model from a JSON value, for fuzzing and for the driver.
pub fn parse<T: serde::de::DeserializeOwned + Default>(v: &Value) -> Result<T, String> {
    if v.is_null() {
        return Ok(T::default());
    }
    T::deserialize(v).map_err(|e| e.to_string())
}

/// Parses every model from `bytes` (JSON); used by the fuzz target. Never panics.
pub fn parse_all(bytes: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let _ = parse::<ServiceRoot>(&v);
    let _ = parse::<Collection>(&v);
    let _ = parse::<System>(&v);
    let _ = parse::<Manager>(&v);
    let _ = parse::<VirtualMedia>(&v);
    let _ = parse::<Task>(&v);
    let _ = parse::<ActionInfo>(&v);
    let _ = error_message(&v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_system_with_oem_and_errors() {
        let v = serde_json::json!({
            "Id": "1", "PowerState": "On",
            "Boot": {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Pxe",
                     "BootSourceOverrideTarget@Redfish.AllowableValues": ["Pxe", "Hdd"]},
            "Actions": {"#ComputerSystem.Reset": {"target": "/r",
                "ResetType@Redfish.AllowableValues": ["On", "ForceOff"]}},
            "Oem": {"Vendor": {"x": 1}}
        });
        let s: System = parse(&v).expect("parses");
        assert_eq!(s.power_state.as_deref(), Some("On"));
        assert_eq!(
            s.actions.and_then(|a| a.reset).map(|r| r.allowable.len()),
            Some(2)
        );
        let e = serde_json::json!({"error": {"message": "General error",
            "@Message.ExtendedInfo": [{"Message": "The property X is read only."}]}});
        assert_eq!(
            error_message(&e),
            "General error; The property X is read only."
        );
        parse_all(b"{\"Members\": 5}");
        parse_all(b"\xff");
    }
}
