"""Validation runs: does an agent reach a known result (e.g. PPO on CartPole)?"""
