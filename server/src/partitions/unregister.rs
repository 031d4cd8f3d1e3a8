//! `/unregister` in two steps: [`plan`] checks the request against the registry (Dynamo's
//! rules and wording) and says what goes; [`apply`] removes it from a view once the removal is
//! logged. The fencing around them is in [`super::Partitions::unregister`].

use std::sync::Arc;

use kvindex_engine::NamespaceKey;

use super::{RegistryError, RegistryView, Removal, UnregisterOutcome};

/// What an accepted unregistration removes.
pub(super) struct Plan {
    /// The blocks to drop (logged before the registry changes).
    pub removal: Removal,
    /// The listener ranks that go.
    pub ranks: Vec<u32>,
    /// The instance's partition.
    pub key: NamespaceKey,
}

/// Check an unregistration against `v` (SERVICE.md §3.4).
pub(super) fn plan(
    v: &RegistryView,
    instance_id: u64,
    model_name: &str,
    routing_group: Option<&str>,
    dp_rank: Option<u32>,
) -> Result<Plan, RegistryError> {
    let inst = v
        .instances
        .get(&instance_id)
        .ok_or(RegistryError::InstanceNotFound(instance_id))?;
    let wrong = || RegistryError::WrongPartition {
        instance_id,
        model: inst.key.model_name.clone(),
        group: inst.key.routing_group.clone(),
    };
    if inst.key.model_name != model_name {
        return Err(wrong());
    }
    // Without a routing group: every group of the model, dp_rank ignored (Dynamo).
    let one_rank = match routing_group {
        Some(g) if inst.key.routing_group != g => return Err(wrong()),
        Some(_) => dp_rank,
        None => None,
    };
    if let Some(dp) = one_rank {
        if !inst.listeners.contains_key(&dp) {
            return Err(RegistryError::DpRankNotFound {
                instance_id,
                dp_rank: dp,
            });
        }
    }
    let key = inst.key.clone();
    let whole = match one_rank {
        None => true,
        Some(dp) => inst.listeners.len() == 1 && inst.listeners.contains_key(&dp),
    };
    let spec = v
        .partitions
        .get(&key)
        .map(|p| Arc::clone(&p.spec))
        .ok_or_else(|| RegistryError::NoIndexer {
            model: key.model_name.clone(),
            group: key.routing_group.clone(),
        })?;
    // The last rank going takes the instance (and ranks seen only in batches) with it.
    let removal = Removal {
        spec,
        worker_id: instance_id,
        dp_rank: if whole { None } else { one_rank },
    };
    let ranks = match removal.dp_rank {
        Some(dp) => vec![dp],
        None => inst.listeners.keys().copied().collect(),
    };
    Ok(Plan {
        removal,
        ranks,
        key,
    })
}

/// Remove what `plan` says from `v`; a partition left without workers is dropped.
pub(super) fn apply(v: &mut RegistryView, plan: &Plan) -> UnregisterOutcome {
    let instance_id = plan.removal.worker_id;
    if let Some(inst) = v.instances.get_mut(&instance_id) {
        for dp in &plan.ranks {
            inst.listeners.remove(dp);
        }
    }
    if plan.removal.dp_rank.is_none() {
        v.instances.remove(&instance_id);
    }
    let mut outcome = UnregisterOutcome::default();
    if !v.instances.values().any(|i| i.key == plan.key) {
        v.partitions.remove(&plan.key);
        outcome.dropped.push(plan.key.clone());
    }
    outcome
}
