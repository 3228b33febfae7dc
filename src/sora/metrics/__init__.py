"""Metrics, the one implementation every part of Sora scores with (fine-tuning's model selection,
``sora evaluate``, compression's gate, the benchmarks): ``labels`` (classification, multi-label, regression,
calibration; scikit-learn and scipy), ``squad`` (official SQuAD v1.1 and CMRC 2018 answer scores), ``semeval``
(the official SemEval-2010 Task 8 score), ``generation`` (sacreBLEU BLEU and chrF, ROUGE-1/2/L; sacrebleu and
rouge-score). Plain functions on arrays and strings: they import nothing of Sora's models, so task kinds
(``sora.tasks``) and evaluation both stand on them. Submodules that need the ``train`` extra are imported where
used, never from here, so the serving path stays free of them."""
