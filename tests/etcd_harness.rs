//! The etcd harness itself: a 3-member cluster starts, elects a leader,
//! survives losing it, and takes the old leader back.

use crate::common;

use common::etcd::EtcdCluster;

#[test]
fn three_members_elect_fail_over_and_rejoin() {
    let mut etcd = EtcdCluster::start(3);
    assert_eq!(etcd.names(), ["etcd0", "etcd1", "etcd2"]);
    let old = etcd.leader();
    let before = etcd.status(old).expect("leader status");

    let put = etcd.etcdctl(old, &["put", "k", "v1"]);
    assert!(put.status.success(), "put: {put:?}");

    etcd.kill9(old);
    assert!(etcd.pid(old).is_none());
    let new = etcd.wait_leader_except(old);
    let after = etcd.status(new).expect("new leader status");
    assert!(
        after.raft_term > before.raft_term,
        "term did not grow: {before:?} -> {after:?}"
    );
    let get = etcd.etcdctl(new, &["get", "k", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v1");

    etcd.restart(old);
    let back = etcd.status(old).expect("restarted member status");
    assert_eq!(
        back.member_id, before.member_id,
        "same member id after restart"
    );
    assert_eq!(back.leader, after.member_id, "follows the new leader");
}

#[test]
fn tls_cluster_answers_with_the_ca() {
    let certs = common::temp_certs();
    let etcd = EtcdCluster::start_tls(1, &certs);
    assert!(etcd.client_url(0).starts_with("https://"));
    let put = etcd.etcdctl(0, &["put", "k", "v"]);
    assert!(put.status.success(), "put over TLS: {put:?}");
    let plain = common::etcd::etcdctl(&etcd.client_address(0), None, &["get", "k"]);
    assert!(!plain.status.success(), "a plaintext client must fail");
}
