//! Small statistics for reports: mean, sample standard deviation, Welch's t-test with the
//! Welch–Satterthwaite degrees of freedom, a 95% interval for a difference of means, and the
//! Student t distribution through the regularized incomplete beta function (Lentz's continued
//! fraction), so that no statistics crate is needed.

/// Arithmetic mean; `None` for no values.
pub fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Sample standard deviation (n − 1 in the denominator); `None` for fewer than two values.
pub fn sample_std(xs: &[f64]) -> Option<f64> {
    sample_var(xs).map(f64::sqrt)
}

/// Sample variance (n − 1 in the denominator); `None` for fewer than two values.
pub fn sample_var(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let m = mean(xs)?;
    Some(xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64)
}

/// Mean, sample standard deviation and count of a set of values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub std: Option<f64>,
}

pub fn summarize(xs: &[f64]) -> Option<Summary> {
    Some(Summary {
        n: xs.len(),
        mean: mean(xs)?,
        std: sample_std(xs),
    })
}

/// Welch's unequal-variance t-test of `b − a`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Welch {
    /// mean(b) − mean(a).
    pub diff: f64,
    /// Standard error of the difference.
    pub se: f64,
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value from the t distribution with `df` degrees of freedom.
    pub p: f64,
    /// 95% confidence interval of `diff`.
    pub ci_low: f64,
    pub ci_high: f64,
}

/// Welch's t-test of mean(b) − mean(a); `None` unless both sides have at least two values
/// and the difference has a nonzero standard error.
pub fn welch(a: &[f64], b: &[f64]) -> Option<Welch> {
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (va, vb) = (sample_var(a)? / na, sample_var(b)? / nb);
    let diff = mean(b)? - mean(a)?;
    let se = (va + vb).sqrt();
    if se <= 0.0 || !se.is_finite() {
        return None;
    }
    let df = (va + vb).powi(2) / (va * va / (na - 1.0) + vb * vb / (nb - 1.0));
    let t = diff / se;
    let p = t_two_sided_p(t, df);
    let q = t_quantile_two_sided(0.05, df);
    Some(Welch {
        diff,
        se,
        t,
        df,
        p,
        ci_low: diff - q * se,
        ci_high: diff + q * se,
    })
}

/// P(|T| ≥ |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2).
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return 0.0;
    }
    let x = df / (df + t * t);
    reg_inc_beta(df / 2.0, 0.5, x).clamp(0.0, 1.0)
}

/// The t such that P(|T| ≥ t) = `alpha` (e.g. 0.05 gives the 97.5% quantile), by bisection.
pub fn t_quantile_two_sided(alpha: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while t_two_sided_p(hi, df) > alpha && hi < 1e12 {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_two_sided_p(mid, df) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-14 * hi.max(1.0) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// ln Γ(x) for x > 0 (Lanczos approximation, g = 7, 9 terms; about 15 digits).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).abs().ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1].
pub fn reg_inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    // The continued fraction converges fast for x < (a+1)/(a+b+2); use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of the incomplete beta function, evaluated with the modified
/// Lentz method.
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    const EPS: f64 = 1e-15;
    let away_from_zero = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / away_from_zero(1.0 - qab * x / qap);
    let mut h = d;
    // One Lentz update with coefficient `aa`; returns the factor h is multiplied by.
    let mut step = |aa: f64| {
        d = 1.0 / away_from_zero(1.0 + aa * d);
        c = away_from_zero(1.0 + aa / c);
        d * c
    };
    for m in 1..=500 {
        let m = m as f64;
        let m2 = 2.0 * m;
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)));
        let del = step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)));
        h *= del;
        if (del - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!(
            (a - b).abs() <= tol * b.abs().max(1e-300),
            "{a} vs {b} (relative tolerance {tol})"
        );
    }

    // Expected values below were computed once with scipy 1.17.1 (python3) and pasted here:
    //   scipy.special.gammaln, scipy.special.betainc, scipy.stats.t.sf / t.ppf,
    //   scipy.stats.ttest_ind(b, a, equal_var=False).
    #[test]
    fn mean_and_sample_std_by_hand() {
        // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squares 32, sample variance 32/7.
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert_eq!(mean(&xs), Some(5.0));
        close(sample_std(&xs).unwrap(), (32.0f64 / 7.0).sqrt(), 1e-15);
        assert_eq!(sample_std(&[1.0]), None);
        assert_eq!(mean(&[]), None);
    }

    #[test]
    fn special_functions_match_scipy() {
        // scipy.special.gammaln(0.5) = ln(sqrt(pi)), gammaln(10) = ln(9!)
        close(ln_gamma(0.5), 0.5723649429247, 1e-13);
        close(ln_gamma(10.0), 12.801827480081469, 1e-13);
        close(ln_gamma(0.1), 2.252712651734206, 1e-13);
        // scipy.special.betainc(2.5, 0.5, 0.3), betainc(10, 3, 0.8), betainc(0.5, 0.5, 0.5)
        close(reg_inc_beta(2.5, 0.5, 0.3), 0.018927124071945658, 1e-10);
        close(reg_inc_beta(10.0, 3.0, 0.8), 0.5583457484800002, 1e-10);
        close(reg_inc_beta(0.5, 0.5, 0.5), 0.5, 1e-12);
    }

    #[test]
    fn t_distribution_matches_scipy() {
        // 2 * scipy.stats.t.sf(2.0, 5) and 2 * t.sf(1.3, 2.7)
        close(t_two_sided_p(2.0, 5.0), 0.10193947882985835, 1e-10);
        close(t_two_sided_p(-1.3, 2.7), 0.29345264370384533, 1e-9);
        // scipy.stats.t.ppf(0.975, df) for df = 1, 4, 30
        close(t_quantile_two_sided(0.05, 1.0), 12.706204736174694, 1e-10);
        close(t_quantile_two_sided(0.05, 4.0), 2.7764451051977934, 1e-10);
        close(t_quantile_two_sided(0.05, 30.0), 2.0422724563012378, 1e-10);
    }

    #[test]
    fn welch_matches_scipy() {
        let a = [1.50, 1.54, 1.47];
        let b = [1.20, 1.26];
        let w = welch(&a, &b).unwrap();
        // scipy.stats.ttest_ind(b, a, equal_var=False): statistic, pvalue, df
        close(w.diff, -0.2733333333333332, 1e-12);
        close(w.t, -7.548711866766242, 1e-9);
        close(w.df, 1.9217445310882622, 1e-9);
        close(w.p, 0.019092104643419483, 1e-8);
        // diff ± t.ppf(0.975, df) * se
        close(w.ci_low, -0.4353695570554712, 1e-8);
        close(w.ci_high, -0.11129710961119521, 1e-8);
        assert!(welch(&[1.0], &b).is_none());
        assert!(welch(&[1.0, 1.0], &[2.0, 2.0]).is_none());
    }
}
