//! State both roles keep: a task cache, the HPKE key ring and the process's metrics.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use duet_core::hpke::HpkeKeypair;
use duet_core::vdaf::{ShareLengths, Vdaf};
use duet_core::{Clock, Task};
use duet_messages::dap09::{HpkeConfigId, HpkeConfigList, TaskId};
use duet_messages::problem::DapProblemType;
use duet_store::Datastore;

use crate::config::AggregatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;

/// A task with its instantiated VDAF.
pub(crate) struct TaskEntry {
    pub task: Task,
    pub vdaf: Vdaf,
    /// The lengths of the VDAF's shares, which bound what an upload may carry.
    pub lengths: ShareLengths,
}

/// What every handler and driver of one role needs.
pub(crate) struct Shared {
    pub store: Arc<dyn Datastore>,
    pub clock: Arc<dyn Clock>,
    pub config: AggregatorConfig,
    pub metrics: Arc<Metrics>,
    tasks: RwLock<HashMap<TaskId, Arc<TaskEntry>>>,
    keys: RwLock<Arc<Vec<HpkeKeypair>>>,
}

impl Shared {
    /// Loads the role's HPKE keys, generating one if there is none.
    pub async fn new(
        store: Arc<dyn Datastore>,
        clock: Arc<dyn Clock>,
        config: AggregatorConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let mut keys = store.get_hpke_keypairs().await?;
        if keys.is_empty() {
            let kp = HpkeKeypair::generate(HpkeConfigId(rand::random()));
            match store.put_hpke_keypair(&kp).await {
                Ok(()) | Err(duet_store::StoreError::AlreadyExists) => {}
                Err(e) => return Err(e.into()),
            }
            keys = store.get_hpke_keypairs().await?;
        }
        Ok(Self {
            store,
            clock,
            config,
            metrics,
            tasks: RwLock::new(HashMap::new()),
            keys: RwLock::new(Arc::new(keys)),
        })
    }

    /// A task, from the cache or the store. Tasks never change once stored.
    pub async fn task(&self, id: &TaskId) -> Result<Option<Arc<TaskEntry>>, Error> {
        if let Some(e) = self.tasks.read().map_err(poisoned)?.get(id) {
            return Ok(Some(Arc::clone(e)));
        }
        let Some(task) = self.store.get_task(id).await? else {
            return Ok(None);
        };
        let vdaf = task.vdaf.instantiate()?;
        let lengths = vdaf.share_lengths()?;
        let entry = Arc::new(TaskEntry {
            task,
            vdaf,
            lengths,
        });
        self.tasks
            .write()
            .map_err(poisoned)?
            .insert(*id, Arc::clone(&entry));
        Ok(Some(entry))
    }

    /// A task, or the `unrecognizedTask` abort.
    pub async fn require_task(&self, id: &TaskId) -> Result<Arc<TaskEntry>, Error> {
        self.task(id).await?.ok_or_else(|| {
            Error::abort(DapProblemType::UnrecognizedTask, Some(*id), "no such task")
        })
    }

    /// The current keypairs.
    pub fn keys(&self) -> Arc<Vec<HpkeKeypair>> {
        self.keys.read().map(|k| Arc::clone(&k)).unwrap_or_default()
    }

    /// The published HPKE config list.
    pub fn hpke_config_list(&self) -> HpkeConfigList {
        HpkeConfigList(self.keys().iter().map(|k| k.config.clone()).collect())
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Internal("a lock was poisoned by a panic".into())
}

/// Finds the keypair for a config ID.
pub(crate) fn find_key(keys: &[HpkeKeypair], id: HpkeConfigId) -> Option<&HpkeKeypair> {
    keys.iter().find(|k| k.config.id == id)
}
