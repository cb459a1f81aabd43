//! Checks of tasks, HPKE keypairs and the health check.

use duet_core::hpke::HpkeKeypair;
use duet_messages::dap09::{HpkeConfigId, TaskId};

use super::task;
use crate::{Datastore, StoreError};

/// Both handles answer the health check.
pub async fn check_health(leader: &dyn Datastore, helper: &dyn Datastore) {
    leader.health_check().await.expect("leader health check");
    helper.health_check().await.expect("helper health check");
}

/// The settings name the engine first, then its version and how durable its commits are.
pub async fn check_settings(store: &dyn Datastore) {
    let settings = store.settings().await.expect("settings");
    let get = |name: &str| {
        settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} in {settings:?}"))
    };
    assert!(settings.iter().all(|(n, v)| !n.is_empty() && !v.is_empty()));
    match get("engine") {
        "sqlite" => {
            assert!(get("sqlite_version").starts_with('3'), "{settings:?}");
            // The log synced in commits, unless only around checkpoints.
            let synchronous = match get("log_sync") {
                "checkpoint" => "NORMAL",
                _ => "FULL",
            };
            assert_eq!(get("synchronous"), synchronous, "{settings:?}");
            assert!(
                ["wal", "memory"].contains(&get("journal_mode")),
                "{settings:?}"
            );
        }
        "postgresql" => {
            assert!(!get("server_version").is_empty());
            for name in ["fsync", "synchronous_commit", "shared_buffers"] {
                get(name);
            }
        }
        other => panic!("unknown engine {other}"),
    }
    assert_eq!(settings[0].0, "engine");
}

/// Tasks: put is idempotent for the same task and refuses a different one; roles are isolated;
/// delete reports whether the task existed.
pub async fn check_tasks(leader: &dyn Datastore, helper: &dyn Datastore) {
    let t = task(TaskId::random());
    assert_eq!(leader.get_task(&t.id).await.expect("get_task"), None);
    leader.put_task(&t).await.expect("put_task");
    assert_eq!(
        leader.get_task(&t.id).await.expect("get_task"),
        Some(t.clone())
    );

    // The same task again is fine; a different one under the same ID is not.
    leader.put_task(&t).await.expect("re-put of the same task");
    let mut different = t.clone();
    different.min_batch_size += 1;
    assert!(matches!(
        leader.put_task(&different).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(
        leader.get_task(&t.id).await.expect("get_task"),
        Some(t.clone())
    );

    // The Helper role does not see the Leader's task, and may store its own under the same ID.
    assert_eq!(helper.get_task(&t.id).await.expect("get_task"), None);
    assert!(!helper
        .list_tasks()
        .await
        .expect("list_tasks")
        .iter()
        .any(|x| x.id == t.id));
    helper.put_task(&different).await.expect("helper put_task");
    assert_eq!(
        helper.get_task(&t.id).await.expect("get_task"),
        Some(different.clone())
    );
    assert_eq!(
        leader.get_task(&t.id).await.expect("get_task"),
        Some(t.clone())
    );

    // list_tasks lists every task of the role.
    let t2 = task(TaskId::random());
    leader.put_task(&t2).await.expect("put_task");
    let listed = leader.list_tasks().await.expect("list_tasks");
    assert!(listed.contains(&t));
    assert!(listed.contains(&t2));
    assert!(!listed.contains(&different));

    // Deleting in one role leaves the other alone.
    assert!(leader.delete_task(&t.id).await.expect("delete_task"));
    assert!(!leader.delete_task(&t.id).await.expect("delete_task again"));
    assert_eq!(leader.get_task(&t.id).await.expect("get_task"), None);
    assert_eq!(
        helper.get_task(&t.id).await.expect("get_task"),
        Some(different)
    );
    assert!(helper.delete_task(&t.id).await.expect("helper delete_task"));
    assert!(leader.delete_task(&t2.id).await.expect("delete_task"));
    assert!(!leader
        .delete_task(&TaskId::random())
        .await
        .expect("delete unknown task"));
}

/// HPKE keypairs: stored per role, ordered by config ID, a taken config ID is refused.
pub async fn check_hpke_keypairs(leader: &dyn Datastore, helper: &dyn Datastore) {
    let k7 = HpkeKeypair::generate(HpkeConfigId(207));
    let k3 = HpkeKeypair::generate(HpkeConfigId(203));
    leader
        .put_hpke_keypair(&k7)
        .await
        .expect("put_hpke_keypair");
    leader
        .put_hpke_keypair(&k3)
        .await
        .expect("put_hpke_keypair");
    let ours = |keys: Vec<HpkeKeypair>| -> Vec<HpkeKeypair> {
        keys.into_iter().filter(|k| k.config.id.0 >= 200).collect()
    };
    let stored = ours(leader.get_hpke_keypairs().await.expect("get_hpke_keypairs"));
    assert_eq!(stored, vec![k3.clone(), k7.clone()]);

    let other = HpkeKeypair::generate(HpkeConfigId(203));
    assert!(matches!(
        leader.put_hpke_keypair(&other).await,
        Err(StoreError::AlreadyExists)
    ));

    // The Helper role has its own keys, with config IDs of its own.
    assert_eq!(
        ours(helper.get_hpke_keypairs().await.expect("get_hpke_keypairs")),
        Vec::new()
    );
    helper
        .put_hpke_keypair(&other)
        .await
        .expect("helper put_hpke_keypair");
    assert_eq!(
        ours(helper.get_hpke_keypairs().await.expect("get_hpke_keypairs")),
        vec![other]
    );
    assert_eq!(
        ours(leader.get_hpke_keypairs().await.expect("get_hpke_keypairs")),
        vec![k3, k7]
    );
}
