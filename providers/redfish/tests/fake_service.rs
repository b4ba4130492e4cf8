//! Fault injection for the code paths sushy-emulator does not exercise: a small fake Redfish
//! service with a SessionService (token expiry, logout), ETags that require If-Match (and a lost
//! race answered 412 once), Reset types in an ActionInfo resource, Reset answered 202 + Task
//! monitor, and virtual media under the Manager that only takes PATCH. The driver's proof against a real service is tests/sushy.rs.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pcg_provider::{
    BareMetal, BmcEndpoint, BootDevice, BootOverride, ErrorKind, PowerAction, PowerState,
};
use pcg_redfish::RedfishDriver;
use serde_json::{json, Value};

#[derive(Default)]
struct Fake {
    token: Option<String>,
    logins: u32,
    logouts: u32,
    power_on: bool,
    pending_power: Option<bool>,
    task_polls: u32,
    etag: u32,
    if_match_seen: Vec<String>,
    fail_next_patch_412: bool,
    boot_target: String,
    boot_enabled: String,
    image: Option<String>,
    resets: Vec<String>,
}

type S = Arc<Mutex<Fake>>;

fn authed(s: &S, h: &HeaderMap) -> bool {
    let f = s.lock().unwrap();
    let got = h.get("x-auth-token").and_then(|v| v.to_str().ok());
    f.token.is_some() && got == f.token.as_deref()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": {"message": "no valid session"}})),
    )
        .into_response()
}

async fn root() -> Json<Value> {
    Json(json!({
        "RedfishVersion": "1.15.0",
        "Systems": {"@odata.id": "/redfish/v1/Systems"},
        "Managers": {"@odata.id": "/redfish/v1/Managers"},
        "SessionService": {"@odata.id": "/redfish/v1/SessionService"},
        "Links": {"Sessions": {"@odata.id": "/redfish/v1/SessionService/Sessions"}}
    }))
}

async fn login(State(s): State<S>, Json(b): Json<Value>) -> Response {
    if b["UserName"] != "root" || b["Password"] != "calvin" {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "bad credentials"}})),
        )
            .into_response();
    }
    let mut f = s.lock().unwrap();
    f.logins += 1;
    let token = format!("tok-{}", f.logins);
    f.token = Some(token.clone());
    (
        StatusCode::CREATED,
        [
            ("x-auth-token", token),
            (
                "location",
                "/redfish/v1/SessionService/Sessions/7".to_owned(),
            ),
        ],
        Json(json!({"@odata.id": "/redfish/v1/SessionService/Sessions/7"})),
    )
        .into_response()
}

async fn logout(State(s): State<S>, h: HeaderMap) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    let mut f = s.lock().unwrap();
    f.token = None;
    f.logouts += 1;
    StatusCode::NO_CONTENT.into_response()
}

async fn systems(State(s): State<S>, h: HeaderMap) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    Json(json!({"Members": [{"@odata.id": "/redfish/v1/Systems/1"}]})).into_response()
}

async fn system(State(s): State<S>, h: HeaderMap) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    let f = s.lock().unwrap();
    let body = json!({
        "Id": "1", "Manufacturer": "Fake", "Model": "F1",
        "PowerState": if f.power_on { "On" } else { "Off" },
        "Boot": {"BootSourceOverrideEnabled": f.boot_enabled, "BootSourceOverrideTarget": f.boot_target,
                 "BootSourceOverrideTarget@Redfish.AllowableValues": ["None", "Pxe", "Hdd", "Cd", "BiosSetup"]},
        "Actions": {"#ComputerSystem.Reset": {"target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
            "@Redfish.ActionInfo": "/redfish/v1/Systems/1/ResetActionInfo"}},
        "Links": {"ManagedBy": [{"@odata.id": "/redfish/v1/Managers/bmc"}]}
    });
    ([("etag", format!("W/\"{}\"", f.etag))], Json(body)).into_response()
}

async fn patch_system(State(s): State<S>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    let mut f = s.lock().unwrap();
    let tag = h
        .get("if-match")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    f.if_match_seen.push(tag.clone());
    if f.fail_next_patch_412 {
        // Someone else changed the resource in between.
        f.fail_next_patch_412 = false;
        f.etag += 1;
        return StatusCode::PRECONDITION_FAILED.into_response();
    }
    if tag != format!("W/\"{}\"", f.etag) {
        return StatusCode::PRECONDITION_FAILED.into_response();
    }
    f.etag += 1;
    if let Some(t) = b["Boot"]["BootSourceOverrideTarget"].as_str() {
        f.boot_target = t.to_owned();
    }
    if let Some(e) = b["Boot"]["BootSourceOverrideEnabled"].as_str() {
        f.boot_enabled = e.to_owned();
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn reset(State(s): State<S>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    let mut f = s.lock().unwrap();
    let t = b["ResetType"].as_str().unwrap_or_default().to_owned();
    f.pending_power = Some(t != "ForceOff");
    f.task_polls = 0;
    f.resets.push(t);
    (
        StatusCode::ACCEPTED,
        [("location", "/redfish/v1/TaskService/Tasks/1/Monitor")],
    )
        .into_response()
}

async fn task(State(s): State<S>, h: HeaderMap) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    let mut f = s.lock().unwrap();
    f.task_polls += 1;
    if f.task_polls < 3 {
        return (
            StatusCode::ACCEPTED,
            Json(json!({"TaskState": "Running", "PercentComplete": 50})),
        )
            .into_response();
    }
    if let Some(p) = f.pending_power.take() {
        f.power_on = p;
    }
    Json(json!({"TaskState": "Completed", "PercentComplete": 100})).into_response()
}

async fn reset_action_info(State(s): State<S>, h: HeaderMap) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    Json(
        json!({"Parameters": [{"Name": "ResetType", "Required": true, "DataType": "String",
        "AllowableValues": ["On", "ForceOff", "PowerCycle", "ForceRestart"]}]}),
    )
    .into_response()
}

async fn managers_bmc(State(s): State<S>, h: HeaderMap) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    Json(json!({"Id": "bmc", "FirmwareVersion": "9.9", "VirtualMedia": {"@odata.id": "/redfish/v1/Managers/bmc/VirtualMedia"}}))
        .into_response()
}

async fn media_coll(State(s): State<S>, h: HeaderMap) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    Json(
        json!({"Members": [{"@odata.id": "/redfish/v1/Managers/bmc/VirtualMedia/Floppy"},
                            {"@odata.id": "/redfish/v1/Managers/bmc/VirtualMedia/CD1"}]}),
    )
    .into_response()
}

async fn media(State(s): State<S>, h: HeaderMap, Path(id): Path<String>) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    let f = s.lock().unwrap();
    if id == "Floppy" {
        return Json(json!({"Id": "Floppy", "MediaTypes": ["Floppy"]})).into_response();
    }
    Json(json!({"Id": "CD1", "MediaTypes": ["CD", "DVD"], "Image": f.image, "Inserted": f.image.is_some()}))
        .into_response()
}

async fn patch_media(State(s): State<S>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if !authed(&s, &h) {
        return unauthorized();
    }
    let mut f = s.lock().unwrap();
    f.image = if b["Inserted"] == true {
        b["Image"].as_str().map(str::to_owned)
    } else {
        None
    };
    StatusCode::NO_CONTENT.into_response()
}

async fn start() -> (String, S) {
    let s: S = Arc::new(Mutex::new(Fake {
        boot_target: "None".into(),
        boot_enabled: "Disabled".into(),
        ..Fake::default()
    }));
    let app = Router::new()
        .route("/redfish/v1/", get(root))
        .route("/redfish/v1/SessionService/Sessions", post(login))
        .route(
            "/redfish/v1/SessionService/Sessions/7",
            axum::routing::delete(logout),
        )
        .route("/redfish/v1/Systems", get(systems))
        .route("/redfish/v1/Systems/1", get(system).patch(patch_system))
        .route(
            "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
            post(reset),
        )
        .route("/redfish/v1/TaskService/Tasks/1/Monitor", get(task))
        .route(
            "/redfish/v1/Systems/1/ResetActionInfo",
            get(reset_action_info),
        )
        .route("/redfish/v1/Managers/bmc", get(managers_bmc))
        .route("/redfish/v1/Managers/bmc/VirtualMedia", get(media_coll))
        .route(
            "/redfish/v1/Managers/bmc/VirtualMedia/{id}",
            get(media).patch(patch_media),
        )
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), s)
}

fn endpoint(url: &str, password: &str) -> BmcEndpoint {
    let mut ep = BmcEndpoint::new(url, "root", password);
    ep.timeout_ms = Some(5_000);
    ep
}

#[tokio::test]
async fn session_auth_tasks_etags_and_manager_media() {
    let (url, s) = start().await;
    let d = RedfishDriver::new(&endpoint(&url, "calvin")).unwrap();
    let caps = d.enrol().await.unwrap();
    assert_eq!(caps.details["auth"], "session", "{caps:?}");
    assert_eq!(caps.details["virtual_media_under"], "Managers", "{caps:?}");
    assert_eq!(caps.details["etag"], true, "{caps:?}");
    assert_eq!(caps.firmware.as_deref(), Some("9.9"));
    // Reset types read from the ActionInfo resource.
    assert_eq!(
        caps.details["reset_types"],
        json!(["On", "ForceOff", "PowerCycle", "ForceRestart"])
    );

    // Reset answered 202 + Task monitor: power() returns once the task completed.
    d.power(&caps.systems[0], PowerAction::On).await.unwrap();
    assert_eq!(d.power_state("1").await.unwrap(), PowerState::On);
    // The service offers PowerCycle: a cycle is one Reset.
    d.power("1", PowerAction::Cycle).await.unwrap();
    assert_eq!(s.lock().unwrap().resets, vec!["On", "PowerCycle"]);
    assert_eq!(d.capabilities().unwrap().details["reset_answer"], 202);

    // PATCH carries If-Match; a lost race (412) is retried once with the fresh ETag.
    s.lock().unwrap().fail_next_patch_412 = true;
    d.set_boot_override("1", &BootOverride::once(BootDevice::Pxe))
        .await
        .unwrap();
    assert_eq!(d.boot_override("1").await.unwrap().device, BootDevice::Pxe);
    let seen = s.lock().unwrap().if_match_seen.clone();
    assert_eq!(seen, vec!["W/\"0\"", "W/\"1\""], "If-Match headers");

    // Virtual media under the Manager, CD slot chosen over the floppy, PATCH fallback.
    d.insert_media("1", "http://10.0.0.2/a.iso").await.unwrap();
    let m = d.media_state("1").await.unwrap().unwrap();
    assert_eq!(m.image.as_deref(), Some("http://10.0.0.2/a.iso"));
    d.eject_media("1").await.unwrap();
    assert!(!d.media_state("1").await.unwrap().unwrap().inserted);

    // An expired token is replaced by one new login.
    s.lock().unwrap().token = Some("expired-elsewhere".into());
    assert_eq!(d.power_state("1").await.unwrap(), PowerState::On);
    assert_eq!(s.lock().unwrap().logins, 2);

    // close() deletes the session.
    d.close().await.unwrap();
    assert_eq!(s.lock().unwrap().logouts, 1);
    assert!(s.lock().unwrap().token.is_none());
}

#[tokio::test]
async fn session_login_rejected_is_auth_error() {
    let (url, _s) = start().await;
    let e = RedfishDriver::new(&endpoint(&url, "wrong"))
        .unwrap()
        .enrol()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(
        e.to_string().contains(&url) && e.to_string().contains("root"),
        "{e}"
    );
}

#[tokio::test]
async fn dropped_driver_deletes_its_session() {
    let (url, s) = start().await;
    let d = RedfishDriver::new(&endpoint(&url, "calvin")).unwrap();
    d.enrol().await.unwrap();
    drop(d);
    for _ in 0..100 {
        if s.lock().unwrap().logouts == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("session not deleted after drop");
}
