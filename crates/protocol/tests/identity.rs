//! Identities and request signatures.

use agora_protocol::{new_nonce, verify_signature, Hash32, Identity, SignedRequest, WorkerId};
use proptest::prelude::*;

#[test]
fn identity_persists_and_signatures_bind_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    let a = Identity::load_or_create(&path).unwrap();
    let b = Identity::load_or_create(&path).unwrap();
    assert_eq!(a.id(), b.id(), "the same key file is the same worker");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let nonce = new_nonce();
    assert_eq!(nonce.len(), 32);
    assert_ne!(nonce, new_nonce(), "nonces are fresh");
    let base =
        SignedRequest { run_id: "run1", method: "POST", path: "/v1/work", round: 7, timestamp_ms: 42, nonce: &nonce };
    let sig = a.sign_request(&base, b"{}");
    let ok = base.signing_message(b"{}");
    assert!(verify_signature(&a.id(), &ok, &sig).is_ok());
    for other in [
        SignedRequest { run_id: "run2", ..base }.signing_message(b"{}"),
        SignedRequest { method: "GET", ..base }.signing_message(b"{}"),
        SignedRequest { path: "/v1/join", ..base }.signing_message(b"{}"),
        SignedRequest { round: 8, ..base }.signing_message(b"{}"),
        SignedRequest { timestamp_ms: 43, ..base }.signing_message(b"{}"),
        SignedRequest { nonce: "00", ..base }.signing_message(b"{}"),
        base.signing_message(b"{ }"),
    ] {
        assert!(verify_signature(&a.id(), &other, &sig).is_err());
    }
    let stranger = Identity::generate().unwrap();
    assert!(verify_signature(&stranger.id(), &ok, &sig).is_err());
}

#[test]
fn ids_and_hashes_parse_strictly() {
    let id = Identity::generate().unwrap().id();
    assert_eq!(id.hex().parse::<WorkerId>().unwrap(), id);
    assert!("zz".parse::<WorkerId>().is_err());
    assert!(id.hex()[..63].parse::<WorkerId>().is_err());
    let h = agora_protocol::hash_bytes(b"abc");
    assert_eq!(h.hex().parse::<Hash32>().unwrap(), h);
    assert_eq!(serde_json::from_str::<Hash32>(&serde_json::to_string(&h).unwrap()).unwrap(), h);
}

proptest! {
    #[test]
    fn malformed_ids_and_signatures_never_panic(s in ".{0,140}") {
        let _ = s.parse::<WorkerId>();
        let _ = s.parse::<Hash32>();
        let id = Identity::from_secret([7; 32]).id();
        let _ = verify_signature(&id, &[0; 32], &s);
    }
}
