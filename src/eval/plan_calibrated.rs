//! `surgery plan --calibrate`, the use case: the candidates of the asked shapes (or of the one
//! layer map given), each shape's costs from the plan of its rule placement, the measurement, and
//! the plan of the placement picked. The CLI checks its flags, reads the text and prints.

use candle_core::Device;

use crate::model::Model;
use crate::plan::calibrate::{given, placements, Calibration, Candidate, ShapeCosts};
use crate::plan::{self, LayerRequest, Plan, PlanRequest, Shape};
use crate::progress::Progress;
use crate::source::SourceModel;

use super::calibrate::{
    calibrate, CalibrateError, CalibrateOptions, CalibrationText, Result, Timings,
};

/// What `plan --calibrate` measures and plans.
pub struct Request<'a> {
    /// The layer map and plan options. When its map names ranges, or `shapes` is empty, the map
    /// is the one placement measured; the options go into every plan.
    pub plan: &'a PlanRequest,
    /// The shapes whose placements are ranked, each once.
    pub shapes: &'a [Shape],
    /// Plan the best ranked placement a plan can hold instead of the request's own map.
    pub pick_best: bool,
    /// Tokens and windows of each measurement.
    pub options: CalibrateOptions,
}

/// The calibration and the plan it leads to.
pub struct Outcome {
    pub calibration: Calibration,
    pub timings: Timings,
    /// The plan, with the calibration recorded in it; None for several shapes and no pick.
    pub plan: Option<Plan>,
    /// The rank of the placement planned when picking chose one other than the first.
    pub picked_rank: Option<usize>,
}

/// Refuses a recurrent source: calibration scores the layers of a static one.
fn check_static(source: &SourceModel) -> Result<()> {
    if source.config.recurrent.is_some() {
        return Err(CalibrateError::Invalid(
            "the model is already recurrent (huginn_raven); calibrate and plan from its static \
             source instead"
                .into(),
        ));
    }
    Ok(())
}

/// Measures `candidates` (from [`candidates`]) on `text` with the static `source` (whose files
/// hash to `hashes`) and plans the placement picked.
pub fn plan_calibrated(
    source: &SourceModel,
    text: &CalibrationText,
    request: &Request,
    candidates: Vec<Candidate>,
    hashes: &[String],
    progress: &mut dyn Progress,
) -> Result<Outcome> {
    check_static(source)?;
    let shape_costs = shape_costs(source, request, &candidates, hashes)?;
    let model = Model::load(source, &Device::Cpu)?;
    let (calibration, timings) = calibrate(
        &model,
        text,
        candidates,
        shape_costs,
        &request.options,
        progress,
    )?;
    drop(model);

    let picked = pick(&calibration, request)?;
    let plan = match &picked {
        Some((_, req)) => {
            let mut plan = plan::make(source, req, hashes)?;
            plan.calibration = Some(calibration.clone());
            Some(plan)
        }
        None => None,
    };
    Ok(Outcome {
        calibration,
        timings,
        plan,
        picked_rank: picked.map(|(rank, _)| rank).filter(|&r| r > 0),
    })
}

/// The placements to measure: of each shape, or the one layer map given. Checks the source is
/// static and every shape fits it, before the text is read.
pub fn candidates(source: &SourceModel, request: &Request) -> Result<Vec<Candidate>> {
    check_static(source)?;
    let n_layers = source.config.n_layers;
    let map = &request.plan.layers;
    if map.has_ranges() || request.shapes.is_empty() {
        return Ok(vec![given(map, n_layers)?]);
    }
    let mut all = Vec::new();
    for &shape in request.shapes {
        all.extend(placements(shape, n_layers)?);
    }
    Ok(all)
}

/// Each shape's costs from the plan of its rule placement (of the given map when it names
/// ranges), which also checks every plan option before the long run.
fn shape_costs(
    source: &SourceModel,
    request: &Request,
    candidates: &[Candidate],
    hashes: &[String],
) -> Result<Vec<ShapeCosts>> {
    let mut shape_costs: Vec<ShapeCosts> = Vec::new();
    for c in candidates {
        if shape_costs.iter().any(|s| s.shape == c.shape) {
            continue;
        }
        let mut req = request.plan.clone();
        if !req.layers.has_ranges() {
            req.layers = LayerRequest {
                shape: c.shape.parse().ok(),
                ..Default::default()
            };
        }
        let costs = plan::make(source, &req, hashes)?.costs;
        shape_costs.push(ShapeCosts {
            shape: c.shape.clone(),
            recurrent_params: costs.recurrent_params,
            at_r: costs.at_r,
        });
    }
    Ok(shape_costs)
}

/// The rank and request of the placement to plan: the best plannable one when picking, the
/// request's own map for one shape (rank 0), none for several shapes without a pick.
fn pick(calibration: &Calibration, request: &Request) -> Result<Option<(usize, PlanRequest)>> {
    if !request.pick_best {
        return Ok((request.shapes.len() <= 1).then(|| (0, request.plan.clone())));
    }
    let best = calibration.best_plannable().ok_or_else(|| {
        CalibrateError::Invalid(
            "no ranked placement has a contiguous core, which a plan needs".into(),
        )
    })?;
    let mut req = request.plan.clone();
    req.layers = best
        .request(request.plan.layers.allow_reuse)
        .unwrap_or_default();
    Ok(Some((best.rank, req)))
}
