//! Policy routes: which ones may share a routing table, and refusing tables
//! the operator already uses. The kernel side is in `daemon::host`.

use crate::model::{PolicyRouteRule, Rule, RuleSpec};
use crate::proto::ErrorCode;
use crate::state::State;

use super::super::host;
use super::{Engine, Failure, Outcome};

/// The policy routes among `rules`, each named for messages (`policy route
/// #3`).
pub(super) fn named_routes<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
) -> Vec<(String, PolicyRouteRule)> {
    rules
        .into_iter()
        .filter_map(|r| match &r.spec {
            RuleSpec::PolicyRoute(p) => Some((format!("policy route #{}", r.id), *p)),
            _ => None,
        })
        .collect()
}

/// Whether another policy route of `state` uses `route`'s table (same
/// family), so deleting `route` must leave the table's default route.
pub(super) fn table_still_used(state: &State, route: &PolicyRouteRule) -> bool {
    named_routes(&state.rules)
        .iter()
        .any(|(_, p)| p != route && shares_table(p, route))
}

fn shares_table(a: &PolicyRouteRule, b: &PolicyRouteRule) -> bool {
    a.table == b.table && a.src_ip.family() == b.src_ip.family()
}

impl Engine {
    /// Checks that `route` can be added next to `others`: a table two
    /// policy routes share has one default route, so they must agree on
    /// the gateway; and a table that holds routes natmap did not create is
    /// the operator's and is refused.
    pub(super) fn check_policy_route(
        &self,
        others: &[(String, PolicyRouteRule)],
        route: &PolicyRouteRule,
    ) -> Outcome<()> {
        let invalid = |m: String| Failure::new(ErrorCode::InvalidArgument, m);
        if let Some((who, other)) = others
            .iter()
            .find(|(_, o)| shares_table(o, route) && o.via != route.via)
        {
            return Err(invalid(format!(
                "--table {} is already used by {who} (from {} via {}); policy routes may \
                 share a table only with the same gateway: use --via {} or another --table",
                route.table, other.src_ip, other.via, other.via
            )));
        }
        let foreign = host::foreign_routes(route).map_err(|e| {
            Failure::new(
                ErrorCode::ApplyFailed,
                format!("cannot read routing table {}: {e}", route.table),
            )
        })?;
        if !foreign.is_empty() {
            return Err(invalid(host::foreign_table_message(route.table, &foreign)));
        }
        Ok(())
    }
}
