"""The simulation's parameters (:class:`SimParams`) and its error for bad arguments."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class SimParams:
    """Physical and bookkeeping parameters of the simulation.

    Values are MIRI-like orders of magnitude chosen so that every effect is visible in a
    short exposure; they are not a calibration of the flight detector. DN are raw
    detector counts ("data numbers"); "linearized DN" are DN after the LINEARITY
    correction, the unit of the truth rate.
    """

    # --- bias and gain -------------------------------------------------------------
    #: Mean reset level ("pedestal") of the raw ramps, DN. MIRI's sits at 10-15 kDN, and
    #: jwst linearises raw DN *including* it (there is no superbias step for MIRI).
    pedestal_dn: float = 12500.0
    #: Pixel-to-pixel scatter of the pedestal, DN (plus a smooth gradient of the same size).
    pedestal_sigma_dn: float = 700.0
    #: Detector gain, electrons per DN (MIRI: a few e-/DN). Written as the GAIN reference
    #: and used to turn electrons into DN, so Poisson noise matches what jwst assumes.
    gain_e_per_dn: float = 5.5
    #: Relative pixel-to-pixel scatter of the gain.
    gain_sigma_frac: float = 0.03

    # --- read noise ----------------------------------------------------------------
    #: Read noise of a difference of two reads (CDS), DN, in FASTR1. This is what the
    #: READNOISE reference holds and what jwst's jump and ramp_fit assume; the simulator
    #: adds sigma = readnoise / sqrt(2) to every single read.
    readnoise_cds_fast_dn: float = 6.0
    #: The same for SLOWR1 (each pixel is sampled many times, so the noise is lower).
    readnoise_cds_slow_dn: float = 2.5
    #: Relative pixel-to-pixel scatter of the read noise.
    readnoise_sigma_frac: float = 0.05

    # --- non-linearity and saturation ----------------------------------------------
    #: MIRI ramps bend over as the pixel fills. The LINEARITY reference is
    #: L(x) = x + c2 x^2 + c3 x^3 on raw DN; this is L(x)/x - 1 at the mean saturation level
    #: (0.08: the corrected signal is 8 % above the raw one there).
    nonlinearity_at_saturation: float = 0.08
    #: Share of that non-linearity carried by the cubic term (the rest is quadratic).
    nonlinearity_cubic_share: float = 0.25
    #: Relative pixel-to-pixel scatter of c2 and c3.
    nonlinearity_sigma_frac: float = 0.10
    #: Mean SATURATION threshold, raw DN (including the pedestal).
    saturation_dn: float = 59000.0
    #: Pixel-to-pixel scatter of the saturation threshold, raw DN.
    saturation_sigma_dn: float = 600.0
    #: The physical full well lies this far above the SATURATION threshold (raw DN): the
    #: threshold is set just below the level where the ramp flattens, so a saturating
    #: pixel is always flagged.
    full_well_margin_dn: float = 1000.0

    # --- dark current and MIRI transients -----------------------------------------
    #: Mean dark current, linearized DN/s (Poisson noise included). It is in the DARK
    #: reference ramp and, averaged, in its AVDRKCUR keyword (jwst adds that to the
    #: Poisson variance).
    dark_current_dn_s: float = 0.3
    #: Amplitude (DN) of the non-linear "dark anomaly": an extra offset that builds up
    #: over the first groups as 1 - exp(-(g+1)/tau). Present in the DARK reference and
    #: in the data, so jwst's dark subtraction removes it. Integration 1 has this
    #: amplitude, later integrations ``dark_anomaly_int2_factor`` times it.
    dark_anomaly_dn: float = 25.0
    dark_anomaly_tau_groups: float = 3.0
    dark_anomaly_int2_factor: float = 1.6
    #: Amplitude (raw DN) of the reset transient: an offset decaying as exp(-g/tau) from
    #: the start of each integration (the reset FETs settle slowly). It is the RESET
    #: reference, which jwst subtracts per integration and group before linearity.
    reset_anomaly_dn: float = 120.0
    reset_tau_groups: float = 1.5
    #: Integrations after the first have a weaker reset transient (this factor).
    reset_int2_factor: float = 0.6
    #: Number of groups the RESET reference covers (jwst corrects only those).
    reset_ngroups: int = 15
    #: Groups jwst's rscd step flags DO_NOT_USE at the start of integration 1 and of
    #: later integrations (written to the RSCD reference for every subarray/read pattern).
    rscd_skip_int1: int = 1
    rscd_skip_int2p: int = 3
    #: RSCD ("reset switch charge decay") transient in integrations >= 2, DN: an offset
    #: decaying over the flagged first groups, and zero from the first unflagged group on
    #: (jwst 3 no longer corrects RSCD, it only flags those groups).
    rscd_anomaly_dn: float = 60.0
    #: Decay of the RSCD transient, groups.
    rscd_tau_groups: float = 1.5
    #: Offset (DN) of the final group of every integration (MIRI's "last frame effect");
    #: jwst's lastframe step flags that group DO_NOT_USE when NGROUPS > 2.
    last_frame_offset_dn: float = -20.0
    #: Full frame only: per-amplifier (column mod 4) and row-parity offsets that wander
    #: from group to group (random walk with this step, DN) and are the same in the
    #: reference columns; jwst's refpix removes them for full frame. (jwst skips refpix
    #: for MIRI subarrays, so subarrays carry no drift.)
    amplifier_drift_step_dn: float = 2.0

    # --- bad pixels (fractions of the light-sensitive pixels of the full frame) -------
    dead_fraction: float = 5e-4  #: DEAD | DO_NOT_USE: no photo-response
    hot_fraction: float = 1e-3  #: HOT | DO_NOT_USE: extra current ``hot_rate_dn_s``
    warm_fraction: float = 1e-3  #: WARM only (still used): extra ``warm_rate_dn_s``
    low_qe_fraction: float = 5e-4  #: LOW_QE only (still used): response times ``low_qe_factor``
    telegraph_fraction: float = 5e-4  #: OTHER_BAD_PIXEL | DO_NOT_USE: random telegraph noise
    unreliable_dark_fraction: float = 3e-4  #: UNRELIABLE_DARK in the DARK reference DQ
    #: Extra current of hot and warm pixels, linearized DN/s (log-uniform in the range).
    hot_rate_dn_s: tuple[float, float] = (50.0, 2000.0)
    warm_rate_dn_s: tuple[float, float] = (1.0, 5.0)
    low_qe_factor: float = 0.5
    #: Random-telegraph pixels jump between two levels this far apart (DN), switching
    #: with probability ``telegraph_switch_prob`` per group.
    telegraph_amplitude_dn: float = 80.0
    telegraph_switch_prob: float = 0.15
    #: Pixels of the full frame whose LINEARITY coefficients are NaN (jwst: no
    #: correction, NO_LIN_CORR) and whose SATURATION threshold is NaN (jwst: NO_SAT_CHECK).
    #: The simulated data of those pixels are linear / never clipped accordingly.
    n_no_lin_corr: int = 40
    n_no_sat_check: int = 20

    # --- scene -----------------------------------------------------------------------
    #: Sky (zodiacal + telescope) background, linearized DN/s, the same in every
    #: light-sensitive pixel apart from a +-``sky_gradient_frac`` ramp across the frame.
    sky_dn_s: float = 20.0
    sky_gradient_frac: float = 0.05
    #: Gaussian PSF sigma, pixels (MIRI F770W: FWHM ~0.27" ~ 2.4 pixels of 0.11").
    psf_sigma_pix: float = 1.0
    #: The named sources are specified by how far their peak pixel fills the
    #: linear range (saturation - pedestal) by the last group, so every subarray and
    #: ramp length shows the same behaviour. The saturating source crosses the
    #: SATURATION threshold at this fraction of the ramp (0.5: half-way up).
    saturating_source_at: float = 0.5
    bright_source_fill: float = 0.5
    medium_source_fill: float = 0.08
    faint_source_fill: float = 0.01
    #: Further random point sources per 10 000 pixels, peak fill log-uniform in
    #: ``random_source_fill``.
    random_sources_per_10k_pix: float = 4.0
    random_source_fill: tuple[float, float] = (0.002, 0.2)

    # --- cosmic rays -----------------------------------------------------------------
    #: Primary cosmic-ray hits per cm^2 per second (galactic cosmic rays near L2: ~5).
    cosmic_ray_rate_cm2_s: float = 5.0
    #: MIRI pixel pitch, micrometres (sets the hit rate per pixel).
    pixel_pitch_um: float = 25.0
    #: At least this many primary hits per integration, so that short subarray ramps
    #: still exercise jump detection (a test convenience, not physics).
    min_cosmic_rays_per_int: int = 30
    #: Hit amplitudes are log-uniform between these multiples of the pixel's noise on a
    #: group difference (sigma^2 = readnoise^2 + rate * tgroup / gain): from invisible to
    #: > 1000 sigma (jwst flags the 4 neighbours of 10-1000 sigma jumps).
    cosmic_ray_sigma_range: tuple[float, float] = (2.0, 5000.0)
    #: Fraction of a hit's charge that also lands in each of its 4 neighbours (charge
    #: diffusion); those deposits are listed in the catalogue as secondary jumps.
    cosmic_ray_neighbor_fraction: float = 0.02

    # --- large cosmic-ray events; off by default ---------------------------------------
    #: MIRI showers per integration (Poisson mean): faint charge from secondaries spread
    #: over a disk tens of pixels across, all arriving in one group (jwst's
    #: ``find_showers`` looks for them). Zero: none, and the outputs are byte-identical
    #: to those of a simulator without large events.
    showers_per_int: float = 0.0
    #: Shower radius, pixels (uniform in this range).
    shower_radius_px: tuple[float, float] = (8.0, 25.0)
    #: Shower charge per pixel at its centre, in multiples of the pixel's noise on a group
    #: difference (uniform in this range): too faint for the two-point search alone. It
    #: falls off as 1 - 0.5 (r/R)^2 to the edge.
    shower_sigma_range: tuple[float, float] = (1.5, 4.0)
    #: Snowballs per integration (Poisson mean): a bright core that saturates within its
    #: group, ringed by a fainter halo (jwst's ``expand_large_events``).
    snowballs_per_int: float = 0.0
    #: Radius of the saturating core, pixels (uniform): cores 5-12 px across.
    snowball_core_radius_px: tuple[float, float] = (2.5, 6.0)
    #: Charge in the core, as a fraction of the pixel's linear range (> 1 saturates).
    snowball_core_fill: float = 1.5
    #: The halo reaches this many core radii, with this fraction of the core's charge.
    snowball_halo_radii: float = 2.0
    snowball_halo_fraction: float = 0.02

    # --- observation and bookkeeping ------------------------------------------------
    #: FILTER keyword (imaging subarrays); coronagraph and LRS subarrays get theirs.
    filter: str = "F770W"
    #: DATE-OBS / TIME-OBS (UTC) of the exposure start.
    date_obs: str = "2024-03-01"
    time_obs: str = "12:00:00.000"
    #: Pointing of the reference pixel (deg) and V3 position angle (deg).
    target_ra: float = 80.4875
    target_dec: float = -69.4986
    pa_v3: float = 250.0
    #: Write mask/saturation/linearity/gain/readnoise as full-frame (1032 x 1024)
    #: references that the steps cut to the subarray, as CRDS ships them. False writes
    #: them at the subarray size instead (smaller and faster for tiny cases).
    fullframe_refs: bool = True
    #: CRDS step-parameter references to ship in the cache, as operations do: jwst step
    #: class name -> the parameters its ``pars-<class>`` file sets, e.g.
    #: ``{"JumpStep": {"rejection_threshold": 3.0}}`` (``"Detector1Pipeline"`` may hold a
    #: ``"steps"`` mapping). Written as stpipe ASDF parameter files selected by an rmap;
    #: every other pars type stays N/A. Empty (the default): none, and the outputs are
    #: those of a simulator without this option.
    crds_pars: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    # --- electromagnetic interference (EMI); off by default ----------------------------
    #: MIRI's readout electronics pick up sinusoidal interference (390.625 Hz in most
    #: subarrays, a ~10.04 Hz line everywhere; jwst's ``emicorr`` step removes it). Each
    #: frequency f (Hz) adds ``A sin(2 pi f t + phi)`` raw DN to every read, where t (s) is
    #: the time the pixel is read on the 10 us pixel clock (:func:`emi_read_clocks`: the
    #: four amplifiers read columns 4k..4k+3 together, rows follow each other every "row
    #: clocks", frames every "frame clocks", and one reset frame separates integrations),
    #: counted from the first read of the exposure. Empty: no EMI, and the outputs are
    #: byte-identical to those of a simulator without EMI support.
    emi_frequencies_hz: tuple[float, ...] = ()
    #: Semi-amplitude A of each frequency, raw DN (same length as ``emi_frequencies_hz``).
    emi_amplitudes_dn: tuple[float, ...] = ()
    #: Phase phi of each frequency at the first read of the exposure, radians (entries
    #: left out are 0).
    emi_phases_rad: tuple[float, ...] = ()

    @property
    def has_emi(self) -> bool:
        return bool(self.emi_frequencies_hz or self.emi_amplitudes_dn or self.emi_phases_rad)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (tuples become lists). The EMI fields appear only when EMI
        is injected, so that EMI-free outputs (file names included) stay as they were."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        if not self.has_emi:
            for key in _EMI_FIELDS:
                out.pop(key, None)
        if not self.crds_pars:
            out.pop("crds_pars", None)
        if not self.has_large_events:
            for key in _LARGE_EVENT_FIELDS:
                out.pop(key, None)
        return out

    @property
    def has_large_events(self) -> bool:
        return self.showers_per_int > 0 or self.snowballs_per_int > 0


_EMI_FIELDS = ("emi_frequencies_hz", "emi_amplitudes_dn", "emi_phases_rad")
_LARGE_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(SimParams)
                            if f.name.startswith(("shower", "snowball")))
#: what ``simulate(large_events=True)`` sets when the params leave both rates at zero
LARGE_EVENT_RATES = {"showers_per_int": 2.0, "snowballs_per_int": 1.0}



class SimulationError(ValueError):
    """Bad arguments to :func:`simulate` (the message is one line)."""

