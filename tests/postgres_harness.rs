//! The PostgreSQL harness itself, without the portal: a primary and a
//! streaming standby replicate, the standby promotes onto a new timeline, and
//! a primary stopped like a crash comes back on its old one.

use crate::common;

use common::pg::*;

#[test]
fn primary_and_standby_replicate_promote_and_restart() {
    let (mut primary, standby) = primary_and_standby();
    assert!(!primary.is_in_recovery());
    assert!(standby.is_in_recovery());
    assert_eq!(primary.timeline(), 1);
    assert_eq!(standby.timeline(), 1);
    assert_eq!(
        primary.psql("select inet_server_port()"),
        primary.port().to_string()
    );

    primary.psql("create table harness (v text); insert into harness values ('replicated')");
    standby.wait_psql(
        "select coalesce((select v from harness), 'none')",
        "replicated",
    );

    primary.stop_immediate();
    assert!(primary.try_psql("select 1").is_err());
    standby.promote();
    assert_eq!(standby.timeline(), 2);
    standby.psql("insert into harness values ('after promotion')");

    // The old primary restarts as a primary on timeline 1, knowing nothing
    // of the promotion.
    primary.start();
    assert!(!primary.is_in_recovery());
    assert_eq!(primary.timeline(), 1);
    assert_eq!(primary.psql("select count(*) from harness"), "1");
}
