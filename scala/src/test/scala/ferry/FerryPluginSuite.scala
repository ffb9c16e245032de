package ferry

import java.io.File
import java.lang.management.ManagementFactory

import scala.jdk.CollectionConverters._
import scala.sys.process._

import org.apache.spark.SparkConf
import org.apache.spark.sql.{Row, SparkSession}
import org.apache.spark.sql.types._
import org.scalatest.funsuite.AnyFunSuite

class FerryPluginSuite extends AnyFunSuite {

  test("prestart count: spark.ferry.worker.prestart, else the executor's task slots") {
    def count(settings: (String, String)*) = FerryPlugin.prestartCount(new SparkConf(false).setAll(settings))
    assert(count("spark.master" -> "local") == 1)
    assert(count("spark.master" -> "local[3]") == 3)
    assert(count("spark.master" -> "local[4, 2]") == 4)
    assert(count("spark.master" -> "local[*]") == Runtime.getRuntime.availableProcessors())
    assert(count("spark.master" -> "spark://h:7077", "spark.executor.cores" -> "4", "spark.task.cpus" -> "2") == 2)
    assert(count("spark.master" -> "yarn") == 1)
    assert(count("spark.master" -> "local[3]", FerryPlugin.Prestart -> "0") == 0)
    assert(count("spark.master" -> "local[3]", FerryPlugin.Prestart -> " 5 ") == 5)
    val bad = intercept[IllegalArgumentException](count(FerryPlugin.Prestart -> "two"))
    assert(bad.getMessage.contains(FerryPlugin.Prestart) && bad.getMessage.contains("'two'"))
    intercept[IllegalArgumentException](count(FerryPlugin.Prestart -> "-1"))
  }

  test("spark.plugins=ferry.FerryPlugin starts the workers with the executor, and tasks use them") {
    // A SparkContext of its own needs a JVM of its own: this one shares TestSpark's session.
    val jvm = ManagementFactory.getRuntimeMXBean.getInputArguments.asScala.filter(a =>
      a.startsWith("--add-") || a.startsWith("-D") || a.startsWith("-XX:"))
    val java = new File(sys.props("java.home"), "bin/java").getAbsolutePath
    val cmd = Seq(java) ++ jvm ++ Seq("-Xmx1g", "-cp", sys.props("java.class.path"), "ferry.PluginCheck",
      TestSpark.python, TestSpark.repo)
    val out = new StringBuilder
    val code = Process(cmd, None, "SPARK_LOCAL_IP" -> "127.0.0.1").!(ProcessLogger(
      l => out.append(l).append('\n'), l => if (!l.contains(" INFO ")) out.append(l).append('\n')))
    val text = out.toString
    assert(code == 0, text.takeRight(4000))
    val Before = """BEFORE_ANY_JOB (\d+) \[(.*)\]""".r.unanchored
    val After = """AFTER_JOB (\d+) \[(.*)\]""".r.unanchored
    val (before, beforePids) = text match { case Before(n, p) => (n.toInt, p); case _ => fail(text.takeRight(4000)) }
    val (after, afterPids) = text match { case After(n, p) => (n.toInt, p); case _ => fail(text.takeRight(4000)) }
    assert(before == 2, s"local[2] prestarts 2 workers before any job:\n$text")
    assert(after == 2 && afterPids.split(", ").toSet == beforePids.split(", ").toSet,
      s"the job ran on the prestarted workers, starting none:\n$text")
    assert(text.contains("CONVOLVE_OK"), text.takeRight(4000))
  }
}

/** The forked JVM of FerryPluginSuite: a local[2] session with the plugin, then a Convolve. */
object PluginCheck {
  def main(args: Array[String]): Unit = {
    val Array(python, repo) = args
    val spark = SparkSession.builder().master("local[2]").appName("ferry-plugin-check")
      .config("spark.ui.enabled", "false")
      .config("spark.plugins", "ferry.FerryPlugin")
      .config(FerryConf.Python, python)
      .config(FerryConf.WorkerPythonPath, repo)
      .getOrCreate()
    try {
      val pool = WorkerPool.get(FerryConf.get(spark))
      // The plugin starts them in the background: wait for both, with no job run yet.
      val deadline = System.nanoTime() + 60L * 1000000000L
      while (pool.size < 2 && System.nanoTime() < deadline) Thread.sleep(50)
      println(s"BEFORE_ANY_JOB ${pool.size} [${pool.pids.sorted.mkString(", ")}]")
      val n = 5000
      val re = Array.tabulate(n)(i => math.sin(i * 0.7))
      val im = Array.tabulate(n)(i => math.cos(i * 0.3))
      val schema = StructType(Seq(StructField("id", LongType), StructField("real", DoubleType),
        StructField("imag", DoubleType)))
      val df = spark.createDataFrame(spark.sparkContext.parallelize(re.indices.map(i => Row(i.toLong, re(i), im(i))), 2),
        schema)
      val (kr, ki) = (Array(0.5, -1.0, 0.25), Array(0.0, 0.5, 1.0))
      val got = new Convolve().setKernelReal(kr).setKernelImag(ki).transform(df).collect()
      val (er, ei) = ConvolveSuite.reference(re, im, kr, ki, "same")
      require(got.length == n, s"${got.length} rows")
      got.foreach { r =>
        val o = r.getLong(0).toInt
        require(math.abs(r.getDouble(1) - er(o)) <= 1e-9 * (1 + math.abs(er(o))) &&
          math.abs(r.getDouble(2) - ei(o)) <= 1e-9 * (1 + math.abs(ei(o))), s"output $o differs")
      }
      println("CONVOLVE_OK")
      println(s"AFTER_JOB ${pool.size} [${pool.pids.sorted.mkString(", ")}]")
    } finally spark.stop()
  }
}
