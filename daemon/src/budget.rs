//! How much memory cached experts may hold, and whether they need a store at all.
//!
//! A budget is written as `auto`, a size (`8GiB`) or a percentage of all the
//! model's experts (`25%`), the same as `odmoe run --expert-budget`. It becomes
//! bytes only once the model is known, since a percentage and `auto` depend on
//! the size of its experts; `auto` also depends on the model's other weights,
//! measured once it is loaded (the memory-pressure controller sizes it).

use odmoe_config::{ExpertBudget, Size, format_bytes};
use odmoe_engine::store::budget::parse_budget_size;

/// How the budget of a model was asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BudgetKind {
    /// A size: the budget starts there and never grows above it.
    Fixed(u64),
    /// Sized from the memory limit (see `memory.auto_fraction`).
    Auto,
}

/// Where a model's experts live, once its size is known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement {
    /// Every expert read at load and kept: the budget holds them all.
    Resident,
    /// Experts read on demand into a store with this budget, which follows
    /// memory pressure.
    OnDemand(BudgetKind),
}

/// An expert budget as configured, before the model's size is known.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetSpec {
    /// Decided from the machine's memory.
    Auto,
    /// A number of bytes or a percentage of all experts.
    Size(Size),
}

impl BudgetSpec {
    /// Reads `auto`, a size with its unit or a percentage, checking it now so
    /// that a typo is reported at once rather than when a model loads.
    pub fn parse(text: &str) -> Result<BudgetSpec, String> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(BudgetSpec::Auto);
        }
        parse_budget_size(text)
            .map(BudgetSpec::Size)
            .map_err(|error| error.to_string())
    }

    /// The config file's `model.expert_budget`.
    pub fn from_config(budget: ExpertBudget) -> BudgetSpec {
        match budget {
            ExpertBudget::Auto => BudgetSpec::Auto,
            ExpertBudget::Bytes(bytes) => BudgetSpec::Size(Size::Bytes(bytes)),
            ExpertBudget::Percent(percent) => BudgetSpec::Size(Size::Percent(percent)),
        }
    }

    /// Where the experts of a model whose experts take `total_expert_bytes`
    /// live: resident when a size or percentage holds them all, else on demand.
    ///
    /// `auto` is always on demand, so that memory pressure can shrink the
    /// budget; sized from the machine's memory, it holds every expert when
    /// they fit, read once on first use.
    pub fn resolve(&self, total_expert_bytes: u64) -> Placement {
        match self {
            BudgetSpec::Auto => Placement::OnDemand(BudgetKind::Auto),
            BudgetSpec::Size(size) => {
                let bytes = size.of(total_expert_bytes);
                if bytes < total_expert_bytes {
                    Placement::OnDemand(BudgetKind::Fixed(bytes))
                } else {
                    Placement::Resident
                }
            }
        }
    }
}

impl std::fmt::Display for BudgetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BudgetSpec::Auto => f.write_str("auto"),
            BudgetSpec::Size(Size::Bytes(bytes)) => f.write_str(&format_bytes(*bytes)),
            BudgetSpec::Size(Size::Percent(percent)) => write!(f, "{percent}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(bytes: u64) -> Placement {
        Placement::OnDemand(BudgetKind::Fixed(bytes))
    }

    #[test]
    fn sizes_and_percentages_are_of_all_experts() {
        assert_eq!(BudgetSpec::parse("25%").unwrap().resolve(1000), fixed(250));
        assert_eq!(
            BudgetSpec::parse("1KiB").unwrap().resolve(4096),
            fixed(1024)
        );
    }

    #[test]
    fn a_budget_that_holds_every_expert_keeps_them_resident() {
        let resident = Placement::Resident;
        assert_eq!(BudgetSpec::parse("100%").unwrap().resolve(1000), resident);
        assert_eq!(BudgetSpec::parse("8GiB").unwrap().resolve(1000), resident);
    }

    #[test]
    fn auto_is_always_on_demand() {
        let auto = Placement::OnDemand(BudgetKind::Auto);
        assert_eq!(BudgetSpec::Auto.resolve(1 << 20), auto);
        assert_eq!(BudgetSpec::Auto.resolve(u64::MAX), auto);
    }

    #[test]
    fn nonsense_is_refused_at_once() {
        assert!(BudgetSpec::parse("lots").unwrap_err().contains("lots"));
        assert!(
            BudgetSpec::parse("1.5")
                .unwrap_err()
                .contains("needs a unit")
        );
        assert_eq!(BudgetSpec::parse(" AUTO "), Ok(BudgetSpec::Auto));
    }

    #[test]
    fn the_config_file_spells_the_same_budgets() {
        assert_eq!(
            BudgetSpec::from_config(ExpertBudget::Percent(25.0)).resolve(1000),
            fixed(250)
        );
        assert_eq!(
            BudgetSpec::from_config(ExpertBudget::Bytes(100)).resolve(1000),
            fixed(100)
        );
    }
}
