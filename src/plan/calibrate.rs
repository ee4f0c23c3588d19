//! What `surgery plan --calibrate` measures and how a plan records it (issue 10): the placements
//! of the core a shape allows, each layer's scores and the ranked candidates. The measuring itself
//! runs the model, so it lives in `eval::calibrate`; the plan file carries its results.

use serde::{Deserialize, Serialize};

use super::cost::CostAtR;
use super::{LayerRange, LayerRequest, PlanError, Shape};

/// Where a candidate's core sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// The paper's rule: the C layers just before the coda.
    Rule,
    /// Another block of C consecutive layers between prelude and coda.
    Contiguous,
    /// C layers evenly spaced from the first layer after the prelude to the last before the coda
    /// (a plan holds a contiguous core only, so this one is measured but cannot be picked).
    EvenlySpaced,
    /// The layer map given with --prelude/--core/--coda.
    Given,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Rule => "rule",
            Placement::Contiguous => "contiguous",
            Placement::EvenlySpaced => "evenly spaced",
            Placement::Given => "given",
        }
    }
}

/// The scores of one source layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerScore {
    pub layer: usize,
    /// 1 - mean cos(input, output) over all tokens (ShortGPT); 0 for an identity layer.
    #[serde(with = "score")]
    pub block_influence: f64,
    /// Mean ||output - input|| / ||input|| over all tokens.
    #[serde(with = "score")]
    pub relative_update: f64,
    /// Perplexity of the source without this layer, on the first `subset_tokens` tokens.
    #[serde(with = "score")]
    pub removal_perplexity: f64,
}

/// The costs shared by every placement of one shape (from the plan of its rule placement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeCosts {
    /// P,C,K
    pub shape: String,
    pub recurrent_params: u64,
    pub at_r: Vec<CostAtR>,
}

/// One measured placement: the layers of the pruned static model and its perplexities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// 1 for the best.
    pub rank: usize,
    /// P,C,K
    pub shape: String,
    pub placement: Placement,
    pub prelude: LayerRange,
    /// Source layers of the core, in order.
    pub core: Vec<usize>,
    pub coda: LayerRange,
    /// The core as `a..b` when it is contiguous: only then can a plan hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_range: Option<LayerRange>,
    /// Source layers no part uses.
    pub dropped: Vec<LayerRange>,
    /// Perplexity of the pruned static model on the first `subset_tokens` tokens.
    #[serde(with = "score")]
    pub subset_perplexity: f64,
    /// Perplexity on all `tokens` tokens; absent when this placement was not re-scored.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_score")]
    pub perplexity: Option<f64>,
}

impl Candidate {
    /// Source layers of the pruned static model, in order: prelude, core, coda.
    pub fn layers(&self) -> Vec<usize> {
        self.prelude
            .iter()
            .chain(self.core.iter().copied())
            .chain(self.coda.iter())
            .collect()
    }

    /// The explicit layer request a plan of this candidate is made from, if a plan can hold it.
    pub fn request(&self, allow_reuse: bool) -> Option<LayerRequest> {
        Some(LayerRequest {
            shape: None,
            prelude: Some(self.prelude),
            core: Some(self.core_range?),
            coda: Some(self.coda),
            allow_reuse,
        })
    }

    /// The core as written in tables: `a..b`, or the list of its layers.
    pub fn core_label(&self) -> String {
        match self.core_range {
            Some(r) => r.to_string(),
            None => {
                let layers: Vec<String> = self.core.iter().map(ToString::to_string).collect();
                layers.join(",")
            }
        }
    }
}

/// Everything `plan --calibrate` measured; the plan file carries it (apply does not read it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// The calibration text as given, and its JSONL field.
    pub data: String,
    pub field: String,
    pub documents: usize,
    /// Tokens scored by the base pass and the re-scoring.
    pub tokens: usize,
    /// Tokens scored by single-layer removal and the first ranking pass (the first ones).
    pub subset_tokens: usize,
    pub seq_len: usize,
    /// Best placements of each shape re-scored on all tokens (the rule placement always is).
    pub rescored_per_shape: usize,
    /// The source model's perplexity on all tokens and on the subset.
    #[serde(with = "score")]
    pub source_perplexity: f64,
    #[serde(with = "score")]
    pub source_subset_perplexity: f64,
    pub layers: Vec<LayerScore>,
    /// Layers by block influence, lowest first: the order ShortGPT drops them in.
    pub drop_order: Vec<usize>,
    pub shapes: Vec<ShapeCosts>,
    /// Best first: the re-scored placements by perplexity on all tokens, then the others by
    /// perplexity on the subset.
    pub candidates: Vec<Candidate>,
}

impl Calibration {
    /// The best candidate a plan can hold (a contiguous core).
    pub(crate) fn best_plannable(&self) -> Option<&Candidate> {
        self.candidates.iter().find(|c| c.core_range.is_some())
    }
}

/// Perplexities are serialized as numbers, and a non-finite one (a model that overflows) as null,
/// read back as +inf: JSON has no NaN or infinity.
mod score {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
    }
}

/// [`score`] for an optional value (absent: not measured).
mod opt_score {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) if x.is_finite() => s.serialize_f64(*x),
            _ => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(Some(
            Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY),
        ))
    }
}

/// The placements of `shape` on `n_layers` layers: prelude = the first P, coda = the last K, the
/// core every block of C consecutive layers between them (the last of which is the paper's rule),
/// and C layers evenly spaced between them when that differs from every block.
pub fn placements(shape: Shape, n_layers: usize) -> Result<Vec<Candidate>, PlanError> {
    // The rule's own checks: too deep, empty core.
    let rule = LayerRequest {
        shape: Some(shape),
        ..Default::default()
    }
    .resolve(n_layers)?;
    let (p, c) = (shape.prelude, shape.core);
    let coda_start = rule.coda.start;
    let mut out: Vec<Candidate> = (p..=coda_start - c)
        .map(|a| {
            let core = LayerRange::new(a, a + c);
            let placement = if core == rule.core {
                Placement::Rule
            } else {
                Placement::Contiguous
            };
            candidate(
                shape,
                placement,
                [rule.prelude, rule.coda],
                core.iter().collect(),
                n_layers,
            )
        })
        .collect();
    let span = coda_start - p;
    if span > c && c >= 2 {
        // Both ends included: layer p + round(j (span - 1) / (c - 1)).
        let core = (0..c)
            .map(|j| p + (j * (span - 1) + (c - 1) / 2) / (c - 1))
            .collect();
        out.push(candidate(
            shape,
            Placement::EvenlySpaced,
            [rule.prelude, rule.coda],
            core,
            n_layers,
        ));
    }
    Ok(out)
}

/// The one candidate of an explicit layer request (--prelude/--core/--coda).
pub fn given(request: &LayerRequest, n_layers: usize) -> Result<Candidate, PlanError> {
    let layers = request.resolve(n_layers)?;
    Ok(candidate(
        layers.shape(),
        Placement::Given,
        [layers.prelude, layers.coda],
        layers.core.iter().collect(),
        n_layers,
    ))
}

/// A candidate, not yet measured; `[prelude, coda]`, the core's layers.
fn candidate(
    shape: Shape,
    placement: Placement,
    [prelude, coda]: [LayerRange; 2],
    core: Vec<usize>,
    n_layers: usize,
) -> Candidate {
    let core_range = match (core.first(), core.last()) {
        (Some(&a), Some(&b)) if b + 1 - a == core.len() => Some(LayerRange::new(a, b + 1)),
        _ => None,
    };
    let mut c = Candidate {
        rank: 0,
        shape: shape.to_string(),
        placement,
        prelude,
        core,
        coda,
        core_range,
        dropped: vec![],
        subset_perplexity: f64::NAN,
        perplexity: None,
    };
    c.dropped = dropped(&c.layers(), n_layers);
    c
}

/// Maximal runs of layers below `n_layers` that `used` leaves out.
fn dropped(used: &[usize], n_layers: usize) -> Vec<LayerRange> {
    let mut out: Vec<LayerRange> = Vec::new();
    for l in (0..n_layers).filter(|l| !used.contains(l)) {
        match out.last_mut() {
            Some(r) if r.end == l => r.end = l + 1,
            _ => out.push(LayerRange::new(l, l + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_of_a_shape() {
        let shape: Shape = "4,8,4".parse().unwrap();
        let all = placements(shape, 30).unwrap();
        // 15 blocks from 4..12 to 18..26, then the evenly spaced core.
        assert_eq!(all.len(), 16);
        assert_eq!(all[0].core_range, Some(LayerRange::new(4, 12)));
        assert_eq!(all[0].dropped, vec![LayerRange::new(12, 26)]);
        assert_eq!(all[14].placement, Placement::Rule);
        assert_eq!(all[14].core_range, Some(LayerRange::new(18, 26)));
        let even = &all[15];
        assert_eq!(even.placement, Placement::EvenlySpaced);
        assert_eq!(even.core, vec![4, 7, 10, 13, 16, 19, 22, 25]);
        assert_eq!(even.core_range, None);
        assert_eq!(even.request(false).map(|r| r.core), None);
        assert_eq!(
            even.layers(),
            vec![0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 26, 27, 28, 29]
        );
        // A shape that leaves no choice has one placement; one too deep is refused.
        let tight = placements("2,2,2".parse().unwrap(), 6).unwrap();
        assert_eq!(tight.len(), 1);
        assert_eq!(tight[0].placement, Placement::Rule);
        let e = placements("4,8,4".parse().unwrap(), 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--shape 4,8,4 needs 16 layers, but the model has 10"
        );
    }

    #[test]
    fn non_finite_scores_round_trip_as_null() {
        let s = LayerScore {
            layer: 0,
            block_influence: 0.5,
            relative_update: f64::NAN,
            removal_perplexity: f64::INFINITY,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(
            j,
            r#"{"layer":0,"block_influence":0.5,"relative_update":null,"removal_perplexity":null}"#
        );
        let back: LayerScore = serde_json::from_str(&j).unwrap();
        assert_eq!(back.removal_perplexity, f64::INFINITY);
    }
}
