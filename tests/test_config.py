"""The configuration loader against benches built in temporary folders.

Every call passes ``env`` and ``cwd`` explicitly, so nothing on the machine running the tests
(a real bench, exported variables) can change the answer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from excel_restaurant_pos.realtime.config import ConfigError, load_config
from harness import make_bench

QUEUE = "redis://127.0.0.1:11000"


@pytest.fixture
def outside(tmp_path) -> Path:
	"""A working directory with no bench at or above it."""
	folder = tmp_path / "elsewhere"
	folder.mkdir()
	return folder


# -- bench discovery -------------------------------------------------------------------


def test_bench_found_by_walking_up_from_cwd(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"site1.local": {}})
	deep = bench / "apps" / "excel_restaurant_pos" / "excel_restaurant_pos"
	deep.mkdir(parents=True)

	config = load_config(env={}, cwd=deep)

	assert config.bench_path == bench.resolve()
	assert config.sites == ("site1.local",)
	assert config.auth_mode == "frappe"


def test_bench_flag_wins_over_env_and_cwd(tmp_path):
	by_flag = make_bench(tmp_path / "by_flag", sites={"flag.local": {}})
	by_env = make_bench(tmp_path / "by_env", sites={"env.local": {}})
	by_cwd = make_bench(tmp_path / "by_cwd", sites={"cwd.local": {}})

	config = load_config(env={"FRAPPE_BENCH_PATH": str(by_env)}, cwd=by_cwd, bench=by_flag)

	assert config.bench_path == by_flag.resolve()
	assert config.sites == ("flag.local",)


def test_frappe_bench_path_wins_over_cwd(tmp_path):
	by_env = make_bench(tmp_path / "by_env", sites={"env.local": {}})
	by_cwd = make_bench(tmp_path / "by_cwd", sites={"cwd.local": {}})

	config = load_config(env={"FRAPPE_BENCH_PATH": str(by_env)}, cwd=by_cwd)

	assert config.bench_path == by_env.resolve()
	assert config.sites == ("env.local",)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_explicit_bench_that_is_not_a_bench_is_an_error(tmp_path, outside, how):
	not_a_bench = tmp_path / "empty"
	not_a_bench.mkdir()
	kwargs = {"bench": not_a_bench, "env": {}} if how == "flag" else {"env": {"FRAPPE_BENCH_PATH": str(not_a_bench)}}

	with pytest.raises(ConfigError) as error:
		load_config(cwd=outside, **kwargs)

	assert str(not_a_bench.resolve()) in str(error.value)
	assert "common_site_config.json" in str(error.value)


def test_folders_without_site_config_are_not_sites(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"site1.local": {}})
	(bench / "sites" / "assets").mkdir()
	(bench / "sites" / "apps.txt").write_text("frappe\n")

	config = load_config(env={}, cwd=bench)

	assert config.sites == ("site1.local",)


# -- standalone ------------------------------------------------------------------------


def test_missing_bench_means_standalone_defaults(outside):
	config = load_config(env={}, cwd=outside)

	assert config.bench_path is None
	assert config.auth_mode == "jwt"
	assert config.sites == ("default",)
	assert config.default_site == "default"
	assert config.port == 9001
	assert config.redis_queue == "redis://127.0.0.1:6379"
	assert config.event_redis_urls == ("redis://127.0.0.1:6379",)
	assert config.frappe_url == "http://127.0.0.1:8000"
	assert config.allowed_origins is None
	assert config.public_rooms == ()
	assert config.jwt_secret("default") is None


def test_standalone_sites_and_secret_from_env(outside):
	env = {"EXCEL_RESTAURANT_POS_SITES": " site1.local , site2.local,", "EXCEL_RESTAURANT_POS_JWT_SECRET": "s3cret"}

	config = load_config(env=env, cwd=outside)

	assert config.sites == ("site1.local", "site2.local")
	assert config.default_site == "site1.local"
	assert config.jwt_secret("site1.local") == "s3cret"
	assert config.jwt_secret("site2.local") == "s3cret"
	assert config.jwt_secret("unknown.local") is None


def test_standalone_default_site_from_frappe_site(outside):
	env = {"EXCEL_RESTAURANT_POS_SITES": "site1.local,site2.local", "FRAPPE_SITE": "site2.local"}

	assert load_config(env=env, cwd=outside).default_site == "site2.local"


def test_standalone_unknown_frappe_site_is_an_error(outside):
	env = {"EXCEL_RESTAURANT_POS_SITES": "site1.local", "FRAPPE_SITE": "nowhere.local"}

	with pytest.raises(ConfigError) as error:
		load_config(env=env, cwd=outside)

	assert "FRAPPE_SITE" in str(error.value)
	assert "nowhere.local" in str(error.value)


# -- precedence ------------------------------------------------------------------------


def test_common_site_config_wins_over_bench_config_json(tmp_path):
	bench = make_bench(
		tmp_path / "bench",
		common={"redis_queue": QUEUE, "webserver_port": 8010},
		sites={"site1.local": {}},
		bench_config={"redis_queue": "redis://127.0.0.1:12000", "excel_restaurant_pos_socketio_port": 9100},
	)

	config = load_config(env={}, cwd=bench)

	assert config.redis_queue == QUEUE
	assert config.port == 9100  # only in config.json: still read
	assert config.webserver_port == 8010
	assert config.frappe_url == "http://127.0.0.1:8010"


def test_site_config_overrides_common_jwt_secret_for_that_site_only(tmp_path):
	bench = make_bench(
		tmp_path / "bench",
		common={"jwt_secret_key": "common-secret"},
		sites={"site1.local": {"jwt_secret_key": "site-one-secret"}, "site2.local": {}},
	)

	config = load_config(env={}, cwd=bench)

	assert config.jwt_secret("site1.local") == "site-one-secret"
	assert config.jwt_secret("site2.local") == "common-secret"


def test_site_without_any_secret_has_none(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"site1.local": {"jwt_secret_key": "one"}, "site2.local": {}})

	config = load_config(env={}, cwd=bench)

	assert config.jwt_secret("site2.local") is None


def test_env_wins_over_bench_files(tmp_path):
	bench = make_bench(
		tmp_path / "bench",
		common={
			"excel_restaurant_pos_socketio_port": 9100,
			"redis_queue": "redis://127.0.0.1:12000",
			"excel_restaurant_pos_socketio_allowed_origins": ["https://file.example"],
		},
		sites={"site1.local": {}},
	)
	env = {
		"EXCEL_RESTAURANT_POS_SOCKETIO_PORT": "9200",
		"FRAPPE_REDIS_QUEUE": QUEUE,
		"EXCEL_RESTAURANT_POS_ALLOWED_ORIGINS": "https://pos.example, https://kds.example",
	}

	config = load_config(env=env, cwd=bench)

	assert config.port == 9200
	assert config.redis_queue == QUEUE
	assert config.allowed_origins == ("https://pos.example", "https://kds.example")


def test_empty_env_value_counts_as_unset(tmp_path):
	bench = make_bench(tmp_path / "bench", common={"excel_restaurant_pos_socketio_port": 9100}, sites={"site1.local": {}})

	config = load_config(env={"EXCEL_RESTAURANT_POS_SOCKETIO_PORT": "", "EXCEL_RESTAURANT_POS_SITES": ""}, cwd=bench)

	assert config.port == 9100
	assert config.sites == ("site1.local",)


def test_flags_win_over_env(outside):
	env = {"EXCEL_RESTAURANT_POS_SOCKETIO_PORT": "9200", "FRAPPE_REDIS_QUEUE": "redis://127.0.0.1:12000"}

	config = load_config({"port": 9300, "redis_queue": QUEUE, "host": None}, env=env, cwd=outside)

	assert config.port == 9300
	assert config.redis_queue == QUEUE
	assert config.host == "0.0.0.0"  # None means "flag not given"


def test_allowed_origins_star_or_empty_allows_any(outside):
	assert load_config(env={"EXCEL_RESTAURANT_POS_ALLOWED_ORIGINS": "*"}, cwd=outside).allowed_origins is None
	assert load_config(env={"EXCEL_RESTAURANT_POS_ALLOWED_ORIGINS": " , "}, cwd=outside).allowed_origins is None


def test_public_rooms_from_json_list_and_env_list(tmp_path):
	bench = make_bench(
		tmp_path / "bench",
		common={"excel_restaurant_pos_socketio_public_rooms": ["menu", "table:*"]},
		sites={"site1.local": {}},
	)

	assert load_config(env={}, cwd=bench).public_rooms == ("menu", "table:*")
	assert load_config(env={"EXCEL_RESTAURANT_POS_PUBLIC_ROOMS": "promo:*"}, cwd=bench).public_rooms == ("promo:*",)


# -- sites and the default site -------------------------------------------------------


def test_sites_env_narrows_bench_sites(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"a.local": {}, "b.local": {}, "c.local": {}})

	config = load_config(env={"EXCEL_RESTAURANT_POS_SITES": "c.local,a.local"}, cwd=bench)

	assert set(config.sites) == {"a.local", "c.local"}


def test_sites_env_naming_a_missing_site_folder_is_an_error(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"a.local": {}})

	with pytest.raises(ConfigError) as error:
		load_config(env={"EXCEL_RESTAURANT_POS_SITES": "a.local,ghost.local"}, cwd=bench)

	assert "EXCEL_RESTAURANT_POS_SITES" in str(error.value)
	assert "ghost.local" in str(error.value)


def test_single_site_bench_makes_that_site_the_default(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"only.local": {}})

	assert load_config(env={}, cwd=bench).default_site == "only.local"


def test_multi_site_bench_has_no_default_unless_configured(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"a.local": {}, "b.local": {}})

	assert load_config(env={}, cwd=bench).default_site is None
	assert load_config(env={"FRAPPE_SITE": "b.local"}, cwd=bench).default_site == "b.local"


def test_default_site_from_common_site_config(tmp_path):
	bench = make_bench(tmp_path / "bench", common={"default_site": "b.local"}, sites={"a.local": {}, "b.local": {}})

	assert load_config(env={}, cwd=bench).default_site == "b.local"


def test_unknown_default_site_is_an_error_naming_the_key(tmp_path):
	bench = make_bench(tmp_path / "bench", common={"default_site": "ghost.local"}, sites={"a.local": {}})

	with pytest.raises(ConfigError) as error:
		load_config(env={}, cwd=bench)

	message = str(error.value)
	assert "common_site_config.json" in message
	assert "default_site" in message
	assert "ghost.local" in message


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["config.json", "sites/common_site_config.json", "sites/site1.local/site_config.json"])
def test_broken_json_names_the_file_and_line(tmp_path, which):
	bench = make_bench(tmp_path / "bench", sites={"site1.local": {}}, bench_config={})
	(bench / which).write_text('{\n "redis_queue": "redis://127.0.0.1:6379",\n "webserver_port": 8000,,\n}\n')

	with pytest.raises(ConfigError) as error:
		load_config(env={}, cwd=bench)

	message = str(error.value)
	assert str(bench / which) in message
	assert "line 3" in message
	assert "\n" not in message


def test_json_that_is_not_an_object_is_an_error(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"site1.local": {}})
	(bench / "sites" / "common_site_config.json").write_text("[1, 2]")

	with pytest.raises(ConfigError, match="common_site_config.json: expected a JSON object"):
		load_config(env={}, cwd=bench)


def test_empty_common_site_config_is_an_empty_object(tmp_path):
	bench = make_bench(tmp_path / "bench", sites={"site1.local": {}})
	(bench / "sites" / "common_site_config.json").write_text("")

	assert load_config(env={}, cwd=bench).sites == ("site1.local",)


def test_bad_port_in_file_names_file_and_key(tmp_path):
	bench = make_bench(tmp_path / "bench", common={"excel_restaurant_pos_socketio_port": "abc"}, sites={"s.local": {}})

	with pytest.raises(ConfigError) as error:
		load_config(env={}, cwd=bench)

	message = str(error.value)
	assert "common_site_config.json" in message
	assert "excel_restaurant_pos_socketio_port" in message
	assert "'abc'" in message


def test_bad_port_in_env_names_the_variable(outside):
	with pytest.raises(ConfigError, match="EXCEL_RESTAURANT_POS_SOCKETIO_PORT.*'abc'"):
		load_config(env={"EXCEL_RESTAURANT_POS_SOCKETIO_PORT": "abc"}, cwd=outside)


def test_bad_port_flag_names_the_option(outside):
	with pytest.raises(ConfigError, match="--port"):
		load_config({"port": "abc"}, env={}, cwd=outside)


def test_port_out_of_range(outside):
	with pytest.raises(ConfigError, match="EXCEL_RESTAURANT_POS_SOCKETIO_PORT.*out of range"):
		load_config(env={"EXCEL_RESTAURANT_POS_SOCKETIO_PORT": "70000"}, cwd=outside)


@pytest.mark.parametrize("url", ["localhost:6379", "redis://", "http://127.0.0.1:6379", "redis://127.0.0.1:port", "127.0.0.1"])
def test_malformed_redis_url_names_the_key(tmp_path, url):
	bench = make_bench(tmp_path / "bench", common={"redis_queue": url}, sites={"s.local": {}})

	with pytest.raises(ConfigError) as error:
		load_config(env={}, cwd=bench)

	assert "key redis_queue" in str(error.value)
	assert repr(url) in str(error.value)


def test_malformed_redis_url_in_env_names_the_variable(outside):
	with pytest.raises(ConfigError, match="FRAPPE_REDIS_QUEUE"):
		load_config(env={"FRAPPE_REDIS_QUEUE": "not a url"}, cwd=outside)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/2", "rediss://cache.example:6380", "unix:///var/run/redis.sock", "redis://:pw@10.0.0.5:6379"])
def test_good_redis_urls_are_kept(outside, url):
	assert load_config(env={"FRAPPE_REDIS_QUEUE": url}, cwd=outside).redis_queue == url


def test_unknown_auth_mode_names_the_key(tmp_path):
	bench = make_bench(tmp_path / "bench", common={"excel_restaurant_pos_socketio_auth": "x"}, sites={"s.local": {}})

	with pytest.raises(ConfigError) as error:
		load_config(env={}, cwd=bench)

	assert "excel_restaurant_pos_socketio_auth" in str(error.value)
	assert "'x'" in str(error.value)


def test_auth_mode_jwt_in_bench(tmp_path):
	bench = make_bench(tmp_path / "bench", common={"excel_restaurant_pos_socketio_auth": "JWT"}, sites={"s.local": {}})

	assert load_config(env={}, cwd=bench).auth_mode == "jwt"


# -- Redis and limits ------------------------------------------------------------------


def test_v14_socketio_redis_is_also_an_event_source(tmp_path):
	socketio = "redis://127.0.0.1:12000"
	bench = make_bench(tmp_path / "bench", common={"redis_queue": QUEUE, "redis_socketio": socketio}, sites={"s.local": {}})

	config = load_config(env={}, cwd=bench)

	assert config.event_redis_urls == (QUEUE, socketio)


def test_same_socketio_and_queue_redis_is_read_once(tmp_path):
	bench = make_bench(tmp_path / "bench", common={"redis_queue": QUEUE, "redis_socketio": QUEUE}, sites={"s.local": {}})

	assert load_config(env={}, cwd=bench).event_redis_urls == (QUEUE,)


def test_limits_from_file_keys(tmp_path):
	bench = make_bench(
		tmp_path / "bench",
		common={
			"excel_restaurant_pos_socketio_max_payload": 2048,
			"excel_restaurant_pos_socketio_rooms_per_socket": 7,
			"excel_restaurant_pos_socketio_events_per_second": 2.5,
			"excel_restaurant_pos_socketio_connections_per_user": 3,
			"excel_restaurant_pos_socketio_expiry_warning": 5,
			"excel_restaurant_pos_socketio_expiry_grace": 1,
		},
		sites={"s.local": {}},
	)

	config = load_config(env={}, cwd=bench)

	assert config.max_payload == 2048
	assert config.rooms_per_socket == 7
	assert config.events_per_second == 2.5
	assert config.connections_per_user == 3
	assert config.expiry_warning == 5.0
	assert config.expiry_grace == 1.0


def test_limits_from_env(outside):
	env = {
		"EXCEL_RESTAURANT_POS_SOCKETIO_MAX_PAYLOAD": "4096",
		"EXCEL_RESTAURANT_POS_SOCKETIO_MAX_UNSENT_BYTES": "65536",
		"EXCEL_RESTAURANT_POS_SOCKETIO_CONNECTIONS_PER_USER": "2",
		"EXCEL_RESTAURANT_POS_SOCKETIO_EXPIRY_WARNING": "0.5",
	}

	config = load_config(env=env, cwd=outside)

	assert config.max_payload == 4096
	assert config.max_unsent_bytes == 65536
	assert config.connections_per_user == 2
	assert config.expiry_warning == 0.5


def test_limit_defaults(outside):
	config = load_config(env={}, cwd=outside)

	assert config.max_payload == 1_000_000
	assert config.max_unsent_bytes == 128 << 20
	assert config.rooms_per_socket == 100
	assert config.events_per_second == 50
	assert config.connections_per_user == 20
	assert config.expiry_warning == 30
	assert config.expiry_grace == 10


def test_bad_limit_names_the_variable(outside):
	with pytest.raises(ConfigError, match="EXCEL_RESTAURANT_POS_SOCKETIO_ROOMS_PER_SOCKET"):
		load_config(env={"EXCEL_RESTAURANT_POS_SOCKETIO_ROOMS_PER_SOCKET": "many"}, cwd=outside)


def test_describe_names_no_secret(tmp_path):
	bench = make_bench(tmp_path / "bench", common={"jwt_secret_key": "very-secret-value"}, sites={"s.local": {}})

	line = load_config(env={}, cwd=bench).describe()

	assert "very-secret-value" not in line
	assert "s.local" in line
