//! The SOAP response parser on envelopes recorded from vcsim (tests/envelopes/*.xml): service
//! content, login, property pages with continuation tokens, VM properties, faults (InvalidLogin,
//! ManagedObjectNotFound, DuplicateName), NotAuthenticated reported in a missingSet, task errors.

#![allow(clippy::unwrap_used)]

use pcg_provider::{ErrorKind, PowerState};
use pcg_vsphere::fault::{Fault, FaultKind};
use pcg_vsphere::soap::{
    missing_set_fault, parse_response, parse_retrieve_result, ParsedError, ServiceContent,
};
use pcg_vsphere::vm_info;

fn envelope(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/envelopes/{name}.xml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn fault(name: &str) -> Fault {
    match parse_response(&envelope(name)) {
        Err(ParsedError::Fault(f)) => f,
        other => panic!("{name}: expected a fault, got {other:?}"),
    }
}

#[test]
fn service_content() {
    let rv = parse_response(&envelope("retrieve_service_content"))
        .unwrap()
        .unwrap();
    let sc = ServiceContent::from_node(&rv).unwrap();
    assert_eq!(sc.root_folder.value, "group-d1");
    assert_eq!(sc.property_collector.value, "propertyCollector");
    assert_eq!(sc.session_manager.kind, "SessionManager");
    assert_eq!(sc.view_manager.kind, "ViewManager");
    assert!(sc.full_name.starts_with("VMware vCenter Server"), "{sc:?}");
}

#[test]
fn login_key() {
    let rv = parse_response(&envelope("login_ok")).unwrap().unwrap();
    assert_eq!(rv.child_text("userName"), Some("user"));
    assert!(!rv.child_text("key").unwrap().is_empty());
}

#[test]
fn faults_are_typed_and_mapped() {
    let f = fault("login_invalid");
    assert_eq!(f.kind(), FaultKind::InvalidLogin);
    assert_eq!(f.message, "Login failure");
    let e = f.into_error("https://vc/sdk", "admin", "Login");
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert!(e.to_string().contains("https://vc/sdk") && e.to_string().contains("admin"));

    let f = fault("managed_object_not_found");
    assert_eq!(f.kind(), FaultKind::ManagedObjectNotFound);
    assert_eq!(f.into_error("e", "u", "op").kind(), ErrorKind::NotFound);

    let f = fault("duplicate_name");
    assert_eq!(f.kind(), FaultKind::DuplicateName);
    assert_eq!(f.into_error("e", "u", "op").kind(), ErrorKind::Conflict);
}

#[test]
fn not_authenticated_in_a_missing_set_is_a_fault() {
    let rv = parse_response(&envelope("not_authenticated")).unwrap();
    let f = missing_set_fault(rv.as_ref()).unwrap();
    assert_eq!(f.kind(), FaultKind::NotAuthenticated);
    let page = parse_response(&envelope("retrieve_properties_page1")).unwrap();
    assert!(missing_set_fault(page.as_ref()).is_none());
}

#[test]
fn property_pages_and_vm_properties() {
    let rv = parse_response(&envelope("retrieve_properties_page1")).unwrap();
    let (objs, token) = parse_retrieve_result(rv.as_ref());
    assert_eq!(objs.len(), 2);
    assert_eq!(token.as_deref(), Some("pcg-vcsim-page-1"));
    let vm = vm_info(&objs[0]);
    assert!(vm.id.starts_with("vm-"), "{vm:?}");
    assert!(!vm.name.is_empty());
    assert_eq!(vm.power, PowerState::Off);
    assert!(vm.cpus.is_some() && vm.memory_mib.is_some(), "{vm:?}");
    assert!(vm.details.contains_key("host"), "{vm:?}");
    assert_eq!(
        objs[0]
            .get("runtime.host")
            .and_then(|n| n.xsi_type.as_deref()),
        Some("ManagedObjectReference")
    );

    let rv = parse_response(&envelope("retrieve_properties_page2")).unwrap();
    let (objs, token) = parse_retrieve_result(rv.as_ref());
    assert!(!objs.is_empty());
    assert_eq!(token.as_deref(), Some("pcg-vcsim-page-2"));
}

#[test]
fn task_error() {
    let rv = parse_response(&envelope("task_info_error")).unwrap();
    let (objs, _) = parse_retrieve_result(rv.as_ref());
    let info = objs[0].get("info").unwrap();
    assert_eq!(info.child_text("state"), Some("error"));
    let f = Fault::from_localized(info.child("error").unwrap());
    assert_eq!(f.kind(), FaultKind::InvalidPowerState);
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    for doc in ["", "<", "<a/>", "<Envelope><Body/></Envelope>", "\u{0}"] {
        assert!(matches!(
            parse_response(doc),
            Err(ParsedError::Malformed(_))
        ));
    }
}
