"""Finite training or a clear failure (issue 23, finding 1): recipes refuse non-finite numbers and out-of-range KD
temperatures at load, naming the field and its line; training checks the loss, the gradient and the weights every
step and fails naming the step, before the update and before anything is saved, so that no manifest marks a NaN
model complete."""

import math

import pytest
import torch

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import parse_recipe
from test_recipe import DEMO, line_of

torch.set_num_threads(1)


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "demo.yaml")
    return str(e.value)


# ---- at load ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN", ".Inf"])
def test_a_non_finite_learning_rate_is_refused_at_its_line(value):
    text = DEMO.replace("      learning_rate: 3.0e-3", f"      learning_rate: {value}")
    msg = error_of(text)
    assert f"demo.yaml:{line_of(text, f'learning_rate: {value}')}: students.0.training.learning_rate: " in msg
    assert "is not a finite number: write a number" in msg


def test_a_non_finite_number_nested_in_the_free_training_dict_is_refused_where_it_is_written():
    teacher = "    warmup_steps: 50\n"
    text = DEMO.replace(teacher, teacher + "    lr_scheduler_kwargs: {min_lr: .nan}\n", 1)
    msg = error_of(text)
    assert f"demo.yaml:{line_of(text, 'min_lr: .nan')}: teacher.training.lr_scheduler_kwargs.min_lr: nan is not a " \
           "finite number" in msg


def test_typed_numbers_of_every_section_refuse_inf_and_nan():
    kd = "kd: {method: offline, divergence: forward_kl, alpha: 0.5, temperature: 1.0}"
    text = DEMO.replace(kd, kd.replace("temperature: 1.0", "temperature: .inf"))
    assert f"demo.yaml:{line_of(text, 'temperature: .inf')}: students.2.kd.temperature: inf is not a finite" in error_of(text)
    text = DEMO.replace(kd, kd.replace("alpha: 0.5", "alpha: .nan"))
    assert "students.2.kd.alpha: nan is not a finite number" in error_of(text)


@pytest.mark.parametrize("temperature", ["0.001", "1.0e+6", "1.0e+300"])
def test_kd_temperatures_outside_their_range_are_refused_with_the_range(temperature):
    kd = "kd: {method: offline, divergence: forward_kl, alpha: 0.5, temperature: 1.0}"
    msg = error_of(DEMO.replace(kd, kd.replace("temperature: 1.0", f"temperature: {temperature}")))
    assert "students.2.kd.temperature: " in msg and "a softmax temperature must be in [0.01, 50.0]" in msg
    on_policy = "kd: {method: on_policy, divergence: reverse_kl, temperature: 1.0"
    text = (DEMO.replace(kd, on_policy.replace("temperature: 1.0", f"temperature: {temperature}") + "}"))
    assert "a softmax temperature must be in [0.01, 50.0]" in error_of(text)


def test_the_shipped_temperatures_and_learning_rates_still_load():
    assert parse_recipe(DEMO.replace("temperature: 1.0}", "temperature: 20.0}", 1), "demo.yaml")
    assert math.isfinite(parse_recipe(DEMO, "demo.yaml").students[0].training["learning_rate"])
